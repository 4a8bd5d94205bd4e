"""Held-out win rate of one checkpoint over another, as the world's judge or a reward model sees it.

    python -m lmforge.winrate a=<ppo.ckpt> b=<sft.ckpt>                  # judge, all held-out test prompts
    python -m lmforge.winrate a=<ckpt> b=<ckpt> prompts=synthetic:test:128 referee=<reward.ckpt>
    python -m lmforge.winrate a=<ckpt> b=<ckpt> prompts=prompts.jsonl referee=<reward.ckpt> out=results.json

Both checkpoints answer the same prompts (each rendered with its own data.prompt_template), the
referee scores every response, and sample i of A meets sample i of B: A wins when its score is
strictly higher. Prints one JSON object on stdout, {a, b, referee, n, wins, ties, losses,
win_rate, ci_low, ci_high, mean_score_a, mean_score_b, by_kind, ...}, where win_rate is
(wins + ties / 2) / comparisons and [ci_low, ci_high] its `confidence` interval from a paired
bootstrap over prompts (`resamples` resamples, seeded by `seed`; lmforge.eval.winrate says why);
and a one-line summary on stderr. by_kind: the same per task kind for synthetic prompts.

* prompts: synthetic:test[:N] (default: all the world's test prompts; the first N are the ones the SFT
  and RL stages evaluate on with data.seed=0), synthetic:val[:N], synthetic:N (N random test
  prompts, as `python -m lmforge.generate` draws them), or a .txt / .jsonl file (prompt_field).
* referee: judge (the synthetic world's ground truth; synthetic prompts only), or the path of a
  reward-model checkpoint (raw rewards; prompt and response rendered with its own template).
* Sampling: greedy (temperature=0) by default, with the stages' held-out evaluation settings
  (max_new_tokens=16, no stop string, so the judge sees all a policy wrote); top_k, top_p,
  stop=["\\nUser:"], and n samples per prompt (with temperature > 0) as in lmforge.generate.
  Both checkpoints sample from the same seed, so a checkpoint against itself ties everywhere.
* out=results.json: the result plus every comparison (prompt, kind, both responses and scores).
* batch_size=16 (prompts per forward pass), device=cpu; --cfg prints the composed config.

A reward-model checkpoint cannot be a or b (it has no language-model head).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from lmforge.cli import compose_command, read_prompts, register_schema, run_cli
from lmforge.errors import UsageError
from lmforge.eval.winrate import check_ci_options, head_to_head, make_referee
from lmforge.inference.language_model import LanguageModel, SamplingSettings, make_generator
from lmforge.training.checkpoint import CheckpointError

# ======================================================================= the config


@dataclass
class WinrateConfig:
    a: str = MISSING  # the checkpoint whose win rate is reported
    b: str = MISSING  # the checkpoint it is compared with
    prompts: str = "synthetic:test"  # synthetic:test[:N] | synthetic:val[:N] | synthetic:N | .txt | .jsonl
    prompt_field: str = "prompt"  # .jsonl prompts: the field holding the prompt
    referee: str = "judge"  # judge | <reward-model checkpoint>
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop: List[str] = field(default_factory=list)
    n: int = 1  # samples per prompt and checkpoint
    seed: int = 0  # sampling and bootstrap
    resamples: int = 2000
    confidence: float = 0.95
    out: Optional[str] = None
    batch_size: int = 16
    device: str = "cpu"


register_schema("winrate_schema", WinrateConfig)

HELD_OUT_SPLITS = ("test", "val")


# ====================================================================== the steps


def load_prompts(spec: str, prompt_field: str = "prompt") -> list[str]:
    """Raw prompts of a spec: synthetic:<split>[:N] is the world's fixed, distinct held-out set
    (the stages' evaluation prompts); anything else is read as `lmforge.generate` reads it."""
    head, _, rest = spec.partition(":")
    split, _, count = rest.partition(":")
    if head == "synthetic" and not split.isdigit():
        from lmforge.world.generator import held_out_prompts

        if split not in HELD_OUT_SPLITS or (count and not count.isdigit()) or count == "0":
            raise UsageError(f"prompts={spec!r}: use synthetic:test or synthetic:val, optionally with :N prompts")
        return held_out_prompts(0, int(count) if count else 1 << 30, split)
    prompts = [r["prompt"] for r in read_prompts(spec, prompt_field)]
    if not prompts:
        raise UsageError(f"prompts={spec}: no prompts in it")
    return prompts


def load_policy(which: str, path: str, device: str) -> LanguageModel:
    try:
        return LanguageModel(path, device)
    except CheckpointError as e:  # say which of the two it is
        raise CheckpointError(f"{which}: {e}") from None


def load_referee(spec: str, device: str):
    try:
        return make_referee(spec, device)
    except CheckpointError as e:
        raise CheckpointError(f"referee: {e}") from None


def sample_responses(lm: LanguageModel, prompts: list[str], cfg: WinrateConfig, s: SamplingSettings) -> list[str]:
    """cfg.n responses per prompt (prompt-major), from a generator seeded by cfg.seed."""
    from lmforge.data.templates import render_prompt

    texts = [render_prompt(lm.default_template, p) for p in prompts for _ in range(cfg.n)]
    return [x.text for x in lm.sample(texts, s, make_generator(cfg.seed, lm.device), cfg.batch_size)]


def summary_line(result: dict) -> str:
    pct = round(100 * result["confidence"])
    return (
        f"A wins {100 * result['win_rate']:.1f}% (ties half; {pct}% CI {100 * result['ci_low']:.1f}-"
        f"{100 * result['ci_high']:.1f}%) over B on {result['n']} prompts: {result['wins']} wins, "
        f"{result['ties']} ties, {result['losses']} losses; mean score {result['mean_score_a']:.3f} (A) vs "
        f"{result['mean_score_b']:.3f} (B), referee {result['referee']}"
    )


def run(cfg: WinrateConfig) -> dict:
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tuple(cfg.stop))
    settings.check()
    check_ci_options(cfg.resamples, cfg.confidence)
    if cfg.n < 1:
        raise UsageError(f"n={cfg.n} must be >= 1")
    if cfg.n > 1 and cfg.temperature == 0:
        raise UsageError(f"n={cfg.n} greedy samples would all be the same; set temperature > 0")
    prompts = load_prompts(cfg.prompts, cfg.prompt_field)
    # Everything that can be refused is refused before the first token is sampled.
    referee = load_referee(cfg.referee, cfg.device)
    referee.check(prompts)
    lm_a, lm_b = load_policy("a", cfg.a, cfg.device), load_policy("b", cfg.b, cfg.device)
    responses_a = sample_responses(lm_a, prompts, cfg, settings)
    responses_b = sample_responses(lm_b, prompts, cfg, settings)
    stats, comparisons = head_to_head(
        prompts,
        responses_a,
        responses_b,
        referee,
        samples_per_prompt=cfg.n,
        resamples=cfg.resamples,
        confidence=cfg.confidence,
        seed=cfg.seed,
    )
    result = {
        "a": cfg.a,
        "b": cfg.b,
        "stage_a": lm_a.stage,
        "stage_b": lm_b.stage,
        "referee": referee.name,
        "prompts": cfg.prompts,
        "samples_per_prompt": cfg.n,
        "confidence": cfg.confidence,
        "resamples": cfg.resamples,
        "sampling": {**settings.as_dict(), "seed": cfg.seed},
        **stats,
    }
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({**result, "comparisons": comparisons}, f, ensure_ascii=False, indent=1)
    return result


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = compose_command(
        "winrate", WinrateConfig, argv, {"a": "<checkpoint>", "b": "<checkpoint>"}, "two policies to compare"
    )
    if cfg is None:  # --cfg
        return None
    result = run(cfg)
    print(json.dumps(result, ensure_ascii=False))
    print(summary_line(result), file=sys.stderr)
    return result


def cli() -> int:
    return run_cli(main, sys.argv[1:], __doc__)


if __name__ == "__main__":
    sys.exit(cli())
