"""The synthetic world's ground-truth judge: a response's score in [0, 1] against the task's
expected answer, and the reward callable RL configs name.

The ground-truth judge
----------------------
:func:`judge` (``prompt``, ``response``) -> score in [0, 1], a pure function.
``prompt`` may be the raw task prompt or a formatted one (the template is
stripped; if several dialogs precede it, the last ``User:`` turn counts). The
task is parsed back with regexes (:func:`lmforge.world.tasks.parse_task`); an unparseable prompt
raises ``ValueError``. Scoring (:func:`score_response`):

* strip the response; empty -> 0.0; the *answer part* is its first line;
* answer part == expected exactly -> 1.0 (before the penalties below), so the
  score is 1.0 exactly when ``response.strip() == answer``;
* numeric kinds (add, sub, mul, compare, length, next): if the first integer in
  the answer part equals the expected -> 0.6 (extra words cost the other 0.4);
  otherwise closeness credit ``0.3 * max(0, 1 - |diff| / 5)``; no number -> 0.0;
* word kinds (reverse, upper): the expected word appearing as a whole word in
  the answer part -> 0.6; otherwise ``0.5 * similarity`` where similarity is the
  mean of the case-sensitive and case-insensitive ``difflib.SequenceMatcher``
  ratios (so "lemon" for "Uppercase: lemon" earns 0.25 rather than 0: the dense
  reward sees that the letters are right and only the case is wrong);
* penalties, cumulative: any text on later lines -0.2; a response longer than
  ``3 * len(expected) + 10`` characters -0.2; clipped at 0, rounded to 6 places.

:func:`judge_batch` and :func:`ground_truth_reward` apply it to lists; the latter
is the reward callable configs name as
``_target_: lmforge.world.judge.ground_truth_reward`` (with Hydra's
``_partial_: true``, or instantiate :class:`GroundTruthReward` instead).
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

from lmforge.world.tasks import NUMERIC_KINDS, Task, parse_task

__all__ = [
    "score_response",
    "judge",
    "judge_batch",
    "ground_truth_reward",
    "GroundTruthReward",
]


# ------------------------------------------------------------------------- judge


def _clip(x: float) -> float:
    return round(min(1.0, max(0.0, x)), 6)


def score_response(task: Task, response: str) -> float:
    """Score ``response`` against ``task``'s expected answer (see the module docstring)."""
    text = response.strip()
    if not text:
        return 0.0
    first, _, rest = text.partition("\n")
    first = first.strip()
    expected = task.answer
    if first == expected:
        score = 1.0
    elif task.kind in NUMERIC_KINDS:
        m = re.search(r"-?\d+", first)
        if m is None:
            score = 0.0
        else:
            diff = abs(int(m.group()) - int(expected))
            score = 0.6 if diff == 0 else 0.3 * max(0.0, 1.0 - diff / 5)
    else:
        if expected in re.findall(r"[A-Za-z]+", first):
            score = 0.6
        else:
            cs = difflib.SequenceMatcher(None, first, expected).ratio()
            ci = difflib.SequenceMatcher(None, first.lower(), expected.lower()).ratio()
            score = 0.5 * (cs + ci) / 2
    if rest.strip():
        score -= 0.2
    if len(text) > 3 * len(expected) + 10:
        score -= 0.2
    return _clip(score)


def judge(prompt: str, response: str) -> float:
    """Ground-truth score in [0, 1] of ``response`` to a raw or formatted ``prompt``."""
    return score_response(parse_task(prompt), response)


def judge_batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """:func:`judge` over parallel lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return [judge(p, r) for p, r in zip(prompts, responses)]


def ground_truth_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward callable for RL: the ground-truth judge over a batch."""
    return judge_batch(prompts, responses)


class GroundTruthReward:
    """Instantiable form of :func:`ground_truth_reward` (for ``_target_`` without ``_partial_``)."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return judge_batch(prompts, responses)
