"""Held-out evaluation with the synthetic world's ground-truth judge, shared by the stages.

`evaluate_judge` greedy-generates one response per prompt and scores it with the judge: the
mean score and the share of exactly right answers (score 1.0) are how SFT and PPO show that
they raise the model's quality. Prompts are RAW task prompts ("What is 7 + 12?"), rendered
with the run's `data.prompt_template` for generation and judged raw, so any template works.
"""

from __future__ import annotations

from typing import Callable, Sequence

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
    "examples": the first n_examples (prompt, response, score) dicts}.
    """
    if judge is None:
        from lmforge.world.judge import judge_batch as judge
    prompts = list(prompts)
    if not prompts:
        return {"judge_score": float("nan"), "exact": float("nan"), "n": 0, "examples": []}
    responses = generate_responses(
        model, tokenizer, prompts, prompt_template=prompt_template, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    scores = [float(s) for s in judge(prompts, responses)]
    return {
        "judge_score": sum(scores) / len(scores),
        "exact": sum(s == 1.0 for s in scores) / len(scores),
        "n": len(scores),
        "examples": [
            {"prompt": p, "response": r, "score": s} for p, r, s in list(zip(prompts, responses, scores))[:n_examples]
        ],
    }
