"""Held-out evaluation with the synthetic world's ground-truth judge, shared by the stages.

`evaluate_judge` greedy-generates one response per prompt and scores it with the judge: the
mean score and the share of exactly right answers (score 1.0) are how SFT and PPO show that
they raise the model's quality. Prompts are RAW task prompts ("What is 7 + 12?"), rendered
with the run's `data.prompt_template` for generation and judged raw, so any template works.

`kind_sums` and `kind_means` break the figures down by the world's task kind ("judge_score/add",
"exact/add"): an average over kinds hides which skills a stage gains or loses. The sums have
the same keys whatever the prompts (zeros for a kind with none), so ranks can reduce them
key by key; a kind without prompts gets no mean.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from lmforge.data.templates import render_prompt
from lmforge.model import generate


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    prompt_template: str,
    max_new_tokens: int,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int = 1234,
) -> list[str]:
    """One response text per raw prompt (greedy by default), EOS and padding removed."""
    device = next(model.parameters()).device
    max_prompt = model.cfg.max_seq_len - max_new_tokens
    if max_prompt < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in model.max_seq_len={model.cfg.max_seq_len}"
        )
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        # Keep the prompt's end (where the answer starts) if it is too long: left truncation.
        ids = [tokenizer.encode(render_prompt(prompt_template, p))[-max_prompt:] for p in chunk]
        res = generate(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            temperature=temperature,
            generator=gen,
        )
        resp = res.sequences[:, res.prompt_len :]
        out += [tokenizer.decode(r[m].tolist()) for r, m in zip(resp, res.response_mask)]
    return out


def kind_sums(prompts: Sequence[str], scores: Sequence[float], score_name: str) -> dict[str, float]:
    """{f"{score_name}/{kind}", f"exact/{kind}", f"n/{kind}"}: the sum of the scores, the number
    of exact answers (1.0) and of prompts of every world task kind. A prompt that is no world
    task (a custom judge's) counts in no kind."""
    from lmforge.world.tasks import KINDS, parse_task

    sums = {f"{stat}/{kind}": 0.0 for kind in KINDS for stat in (score_name, "exact", "n")}
    for prompt, score in zip(prompts, scores):
        try:
            kind = parse_task(prompt).kind
        except ValueError:
            continue
        sums[f"{score_name}/{kind}"] += score
        sums[f"exact/{kind}"] += float(score == 1.0)
        sums[f"n/{kind}"] += 1.0
    return sums


def kind_means(sums: Mapping[str, float]) -> dict[str, float]:
    """The per-kind means of `kind_sums` (perhaps summed over ranks), for kinds with prompts."""
    out = {}
    for key, value in sums.items():
        stat, _, kind = key.partition("/")
        count = float(sums[f"n/{kind}"])
        if stat != "n" and count > 0:
            out[key] = float(value) / count
    return out


def evaluate_judge(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    prompt_template: str,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    judge: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
    n_examples: int = 3,
) -> dict:
    """Greedy responses to raw `prompts`, scored by `judge` (default: the synthetic world's).

    Returns {"judge_score": mean score, "exact": share scoring 1.0, "n": len(prompts),
    "by_kind": {"judge_score/<kind>": mean, "exact/<kind>": share} of the world's task kinds
    among the prompts, "examples": the first n_examples (prompt, response, score) dicts}.
    """
    if judge is None:
        from lmforge.world.judge import judge_batch as judge
    prompts = list(prompts)
    if not prompts:
        return {"judge_score": float("nan"), "exact": float("nan"), "n": 0, "by_kind": {}, "examples": []}
    responses = generate_responses(
        model, tokenizer, prompts, prompt_template=prompt_template, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    scores = [float(s) for s in judge(prompts, responses)]
    return {
        "judge_score": sum(scores) / len(scores),
        "exact": sum(s == 1.0 for s in scores) / len(scores),
        "n": len(scores),
        "by_kind": kind_means(kind_sums(prompts, scores, "judge_score")),
        "examples": [
            {"prompt": p, "response": r, "score": s} for p, r, s in list(zip(prompts, responses, scores))[:n_examples]
        ],
    }
