"""Head-to-head win rate of policy A over policy B on the same prompts, as a referee scores them.

Each prompt gets responses from both policies (the same number, `samples_per_prompt`, laid out
prompt-major: prompt 0's samples, then prompt 1's, ...). Sample i of A meets sample i of B:
A wins when the referee scores its response strictly higher, loses when strictly lower, and
ties otherwise (scores of the world's judge are rounded to 6 places, so ties are real: two
right answers, or the same wrong one). The win rate is (wins + ties / 2) / comparisons, so
0.5 means "no better, no worse" and a policy against itself scores exactly 0.5.

The confidence interval: a paired percentile bootstrap over prompts
--------------------------------------------------------------------
Each prompt contributes one value, its share of won comparisons (ties count half), and the
win rate is their mean. The interval resamples the prompts with replacement (`resamples`
times, 2,000 by default, from a fixed seed, so the same inputs give the same interval) and
takes the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled win rates.

Why not the Wilson score interval? Wilson is exact-in-spirit for independent yes/no trials.
Here the outcome has three values (ties are common: two right answers tie), and with several
samples per prompt the comparisons of one prompt are correlated (an easy prompt is won or tied
by every sample). Wilson on the comparisons would then be too narrow (it counts correlated
samples as independent) and, with many ties, too wide (a tie has no variance around 1/2,
a Bernoulli coin has the most). Resampling whole prompts keeps both facts: ties narrow the
interval as much as they should, and the samples of a prompt stay together ("paired": A and B
are always resampled on the same prompts, so the prompts' difficulty cancels out).

The known weakness: when every prompt has the same value (a policy against itself, or A wins
everywhere) no resample can differ, and the interval collapses to the point. With few prompts
read such an interval as "every prompt agreed", not as certainty; more prompts are the remedy.

The referee is the world's judge (`referee=judge`, synthetic prompts only) or a reward-model
checkpoint (rendered the way `lmforge.eval.reward_scoring.RewardScorer` renders its inputs).
Sampling the policies is the caller's part (`python -m lmforge.winrate` uses
`lmforge.inference.LanguageModel`): this module only needs their response texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lmforge.errors import DataError, UsageError

# ====================================================================== counting outcomes


def _check_paired(scores_a: Sequence[float], scores_b: Sequence[float]) -> None:
    if len(scores_a) != len(scores_b):
        raise ValueError(f"got {len(scores_a)} scores for A but {len(scores_b)} for B")


def compare_scores(scores_a: Sequence[float], scores_b: Sequence[float]) -> tuple[int, int, int]:
    """(wins, ties, losses) of A over B, comparing scores_a[i] with scores_b[i]."""
    _check_paired(scores_a, scores_b)
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    losses = sum(a < b for a, b in zip(scores_a, scores_b))
    return wins, len(scores_a) - wins - losses, losses


def win_rate(wins: int, ties: int, losses: int) -> float:
    """(wins + ties / 2) / comparisons: 1 = A always better, 0.5 = even, 0 = B always better."""
    n = wins + ties + losses
    if n == 0:
        raise ValueError("a win rate needs at least one comparison")
    return (wins + ties / 2) / n


def prompt_outcomes(scores_a: Sequence[float], scores_b: Sequence[float], samples_per_prompt: int = 1) -> list[float]:
    """Each prompt's win rate over its own samples (prompt-major layout): the values the
    bootstrap resamples, one per prompt, so a prompt's correlated samples stay together."""
    _check_paired(scores_a, scores_b)
    k = samples_per_prompt
    if k < 1 or len(scores_a) % k:
        raise ValueError(f"{len(scores_a)} scores are not a whole number of prompts of {k} samples")
    return [win_rate(*compare_scores(scores_a[i : i + k], scores_b[i : i + k])) for i in range(0, len(scores_a), k)]


# ============================================================================ the interval


def _quantiles(sorted_values: np.ndarray, probs: Sequence[float]) -> list[float]:
    """Linear interpolation between order statistics (numpy's default "linear" method),
    written out so the tests can check it by hand."""
    n = len(sorted_values)
    out = []
    for p in probs:
        pos = p * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(float(sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])))
    return out


def check_ci_options(resamples: int, confidence: float) -> None:
    if not 0 < confidence < 1:
        raise UsageError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if resamples < 1:
        raise UsageError(f"resamples={resamples} must be >= 1 (2000 is plenty for a 95% interval)")


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per prompt; see the module
    docstring for why this interval). Deterministic: the same values and seed give the same
    interval."""
    check_ci_options(resamples, confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("a confidence interval needs at least one prompt")
    rng = np.random.default_rng(seed)
    # Index matrices of at most ~4M entries at a time: memory stays bounded for many prompts.
    rows = max(1, min(resamples, 4_000_000 // x.size))
    means = []
    for start in range(0, resamples, rows):
        idx = rng.integers(0, x.size, size=(min(rows, resamples - start), x.size))
        means.append(x[idx].mean(axis=1))
    tail = (1 - confidence) / 2
    low, high = _quantiles(np.sort(np.concatenate(means)), (tail, 1 - tail))
    return low, high


# ============================================================================== summaries


def summarize(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    *,
    samples_per_prompt: int = 1,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """{n (prompts), wins, ties, losses, win_rate, ci_low, ci_high, mean_score_a, mean_score_b}."""
    wins, ties, losses = compare_scores(scores_a, scores_b)
    per_prompt = prompt_outcomes(scores_a, scores_b, samples_per_prompt)
    low, high = bootstrap_ci(per_prompt, resamples=resamples, confidence=confidence, seed=seed)
    return {
        "n": len(per_prompt),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": win_rate(wins, ties, losses),
        "ci_low": low,
        "ci_high": high,
        "mean_score_a": float(np.mean(scores_a)),
        "mean_score_b": float(np.mean(scores_b)),
    }


def task_kind(prompt: str) -> str | None:
    """The synthetic world's task kind of a prompt ("add", "upper", ...), None for other text."""
    from lmforge.world.tasks import parse_task

    try:
        return parse_task(prompt).kind
    except ValueError:
        return None


def by_kind(
    kinds: Sequence[str | None],
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    *,
    samples_per_prompt: int = 1,
    **ci_options,
) -> dict[str, dict]:
    """`summarize` per task kind (kinds[i] is prompt i's; None prompts are left out), by name."""
    k = samples_per_prompt
    out = {}
    for kind in sorted({c for c in kinds if c is not None}):
        rows = [i for i, c in enumerate(kinds) if c == kind]
        a = [scores_a[i * k + j] for i in rows for j in range(k)]
        b = [scores_b[i * k + j] for i in rows for j in range(k)]
        out[kind] = summarize(a, b, samples_per_prompt=k, **ci_options)
    return out


# ============================================================================== referees


class JudgeReferee:
    """The synthetic world's ground-truth judge: a score in [0, 1] against the task's answer."""

    name = "judge"

    def check(self, prompts: Sequence[str]) -> None:
        """Refuse prompts the judge cannot parse before any model is sampled."""
        for i, prompt in enumerate(prompts):
            if task_kind(prompt) is None:
                raise UsageError(
                    f"referee=judge scores synthetic-world prompts only, and prompt {i + 1} ({prompt[:60]!r}) "
                    "is not one; use prompts=synthetic:test, or referee=<reward checkpoint>"
                )

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from lmforge.world.judge import judge_batch

        return [float(s) for s in judge_batch(prompts, responses)]


class RewardModelReferee:
    """A reward-model checkpoint's raw reward of prompt + response, with the checkpoint's own
    template and response prefix (as `python -m lmforge.score` renders them)."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32):
        from lmforge.eval.reward_scoring import RewardScorer

        self.scorer = RewardScorer(path, device)
        self.name = str(path)
        self.batch_size = batch_size

    def check(self, prompts: Sequence[str]) -> None:
        """Any text is fine for a reward model."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from lmforge.data.templates import encode_pair

        s = self.scorer
        ids = []
        for prompt, response in zip(prompts, responses):
            # A policy writes the prefix itself (" 5" after "Assistant:"); render() adds the
            # reward model's, so it is taken off first rather than doubled.
            if s.response_prefix and response.startswith(s.response_prefix):
                response = response[len(s.response_prefix) :]
            try:
                ids.append(encode_pair(s.tokenizer, *s.render(prompt, response), s.seq_len).ids)
            except DataError as e:
                raise UsageError(f"referee={self.name}: {e}; lower max_new_tokens=") from None
        return s.rewards(ids, self.batch_size)


def make_referee(spec: str, device: str = "cpu", batch_size: int = 32):
    """`judge`, or the path of a reward-model checkpoint."""
    if spec == "judge":
        return JudgeReferee()
    return RewardModelReferee(spec, device, batch_size)


def score_pairs(referee, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]):
    """The referee's scores of A's and B's responses (parallel to `prompts`).

    Each distinct (prompt, response) is scored once, so two identical responses always tie,
    even under a reward model whose batches are padded differently (float noise in the last
    bits would otherwise call a winner)."""
    keys = list(dict.fromkeys([*zip(prompts, responses_a), *zip(prompts, responses_b)]))  # in order: reproducible
    scores = dict(zip(keys, referee([p for p, _ in keys], [r for _, r in keys])))
    return [scores[k] for k in zip(prompts, responses_a)], [scores[k] for k in zip(prompts, responses_b)]


def head_to_head(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    referee,
    *,
    samples_per_prompt: int = 1,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """The result ({n, wins, ..., by_kind}) and one record per comparison (prompt, kind, both
    responses and scores) for `prompts` (one entry per prompt) and prompt-major responses."""
    k = samples_per_prompt
    if len(responses_a) != len(prompts) * k or len(responses_b) != len(prompts) * k:
        raise ValueError(f"expected {len(prompts) * k} responses of each policy")
    flat = [p for p in prompts for _ in range(k)]
    scores_a, scores_b = score_pairs(referee, flat, responses_a, responses_b)
    ci = {"resamples": resamples, "confidence": confidence, "seed": seed}
    kinds = [task_kind(p) for p in prompts]
    result = {
        **summarize(scores_a, scores_b, samples_per_prompt=k, **ci),
        "by_kind": by_kind(kinds, scores_a, scores_b, samples_per_prompt=k, **ci),
    }
    records = [
        {
            "prompt": p,
            "kind": kinds[i // k],
            "response_a": ra,
            "response_b": rb,
            "score_a": sa,
            "score_b": sb,
        }
        for i, (p, ra, rb, sa, sb) in enumerate(zip(flat, responses_a, responses_b, scores_a, scores_b))
    ]
    return result, records
