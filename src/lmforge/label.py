"""Preference pairs on a policy's own samples, labelled by the synthetic world's simulated annotator.

    python -m lmforge.label policy=<sft.ckpt> out=pairs.jsonl               # 4,000 training prompts x 4 samples
    python -m lmforge.label policy=<ckpt> out=pairs.jsonl prompts=8000 samples=4 temperature=1.0 noise=0.1
    python train.py algo=reward init_from=<sft.ckpt> data.extra_pairs=pairs.jsonl   # the world's pairs + these

InstructGPT's labellers compared outputs of the model being tuned; the world's own pairs compare
a correct answer with corruptions of it, which is not what an SFT model gets wrong. This command
samples `samples` responses for each of `prompts` training prompts (drawn as the world draws
them: a kind uniformly, then a prompt of that kind), scores each with the world's judge, and lets
the annotator (Bradley-Terry, `noise` as in data.annotator_noise) label every pair of distinct
responses that the judge does not tie. Only the world's *training* prompts are used: the
held-out ones stay unseen by every stage.

Writes one JSON object per pair, {prompt, chosen, rejected, chosen_score, rejected_score, kind}:
the raw task prompt and the responses with the policy's response prefix (a space) removed, the
format `data=jsonl` and `data.extra_pairs` read. An empty response cannot be a record of that
format: pairs with one are left out and counted. Prints a JSON summary on stdout.

* policy: any checkpoint `lmforge.generate` samples from (not a reward model).
* max_new_tokens=8 (the pipeline's PPO rollout length), temperature=1.0 (the rollouts' own), top_k, top_p.
* world_seed: the world's seed (data.seed of the runs that will train on the pairs); seed: the
  prompt draw, the sampling and the annotator's coin.
* batch_size=64 prompts per forward pass, device=cpu; --cfg prints the composed config.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from lmforge.cli import compose_command, register_schema, run_cli
from lmforge.errors import UsageError
from lmforge.inference.language_model import LanguageModel, SamplingSettings, make_generator


@dataclass
class LabelConfig:
    policy: str = MISSING  # the checkpoint whose samples are labelled
    out: str = MISSING  # the JSONL of pairs to write
    prompts: int = 4000  # training prompts drawn (with repeats: the world has 1,377)
    samples: int = 4  # responses per prompt: up to samples * (samples - 1) / 2 pairs each
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_new_tokens: int = 8
    noise: float = 0.0  # the annotator's Bradley-Terry temperature (0 = the judge's order)
    world_seed: int = 0
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"


register_schema("label_schema", LabelConfig)


def check(cfg: LabelConfig) -> SamplingSettings:
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, ())
    settings.check()
    if cfg.prompts < 1:
        raise UsageError(f"prompts={cfg.prompts} must be >= 1")
    if cfg.samples < 2:
        raise UsageError(f"samples={cfg.samples} must be >= 2 (a pair needs two responses)")
    if cfg.temperature == 0:
        raise UsageError("temperature=0 samples the same response every time: no pairs; set temperature > 0")
    if cfg.noise < 0:
        raise UsageError(f"noise={cfg.noise} must be >= 0")
    if os.path.isdir(cfg.out):
        raise UsageError(f"out={cfg.out} is a directory; give a file name such as {cfg.out}/pairs.jsonl")
    return settings


def unprefixed(response: str, prefix: str = " ") -> str:
    """A sampled response as a preference file holds it: without the response prefix the readers add back."""
    return response[len(prefix) :] if prefix and response.startswith(prefix) else response


def label(cfg: LabelConfig) -> dict:
    from lmforge.data.templates import render_prompt
    from lmforge.world.generator import SyntheticWorld

    settings = check(cfg)
    lm = LanguageModel(cfg.policy, cfg.device)
    world = SyntheticWorld(cfg.world_seed)
    tasks = world.tasks(cfg.prompts, "train", seed_offset=cfg.seed)
    texts = [render_prompt(lm.default_template, t.prompt) for t in tasks for _ in range(cfg.samples)]
    samples = lm.sample(texts, settings, make_generator(cfg.seed, lm.device), cfg.batch_size)
    rng = random.Random(f"lmforge-label/{cfg.seed}/{cfg.noise}")
    records, empty, pairs_per_kind = [], 0, {}
    for i, task in enumerate(tasks):
        responses = [s.text for s in samples[i * cfg.samples : (i + 1) * cfg.samples]]
        for r in world.rank_samples(task, responses, cfg.noise, rng):
            chosen, rejected = unprefixed(r["chosen"]), unprefixed(r["rejected"])
            if not chosen.strip() or not rejected.strip():
                empty += 1
                continue
            records.append(
                {
                    "prompt": task.prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": r["chosen_score"],
                    "rejected_score": r["rejected_score"],
                    "kind": task.kind,
                }
            )
            pairs_per_kind[task.kind] = pairs_per_kind.get(task.kind, 0) + 1
    tmp = f"{cfg.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # written whole, then moved: never a half file under `out`
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, cfg.out)
    scores = [s for rec in records for s in (rec["chosen_score"], rec["rejected_score"])]
    repeated = (t for t in tasks for _ in range(cfg.samples))
    exact = sum(1 for t, s in zip(repeated, samples) if s.text.strip() == t.answer)
    return {
        "policy": cfg.policy,
        "out": cfg.out,
        "prompts": len(tasks),
        "responses": len(samples),
        "exact_responses": exact,
        "pairs": len(records),
        "pairs_with_an_empty_response": empty,
        "pairs_by_kind": dict(sorted(pairs_per_kind.items())),
        "label_agreement": (
            sum(rec["chosen_score"] > rec["rejected_score"] for rec in records) / len(records) if records else None
        ),
        "mean_judge_score_in_pairs": sum(scores) / len(scores) if scores else None,
    }


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = compose_command(
        "label", LabelConfig, argv, {"policy": "...", "out": "..."}, "the policy to sample, the JSONL to write"
    )
    if cfg is None:  # --cfg
        return None
    result = label(cfg)
    print(json.dumps(result, ensure_ascii=False))
    return result


def cli() -> int:
    return run_cli(main, sys.argv[1:], __doc__)


if __name__ == "__main__":
    sys.exit(cli())
