"""Per-kind held-out figures (lmforge.eval.heldout.kind_sums / kind_means): the breakdown the
SFT and RL stages log as val/judge_score/<kind>, val/gt_score/<kind> and val/exact/<kind>."""

from __future__ import annotations

import pytest

from lmforge.eval.heldout import kind_means, kind_sums
from lmforge.world.tasks import KINDS

PROMPTS = ["What is 7 + 12?", "What is 1 + 1?", "User: Uppercase: lemon\nAssistant:", "Tell me a joke."]
SCORES = [1.0, 0.24, 0.25, 1.0]


def test_kind_sums_have_every_kind_so_ranks_reduce_the_same_keys():
    sums = kind_sums(PROMPTS, SCORES, "gt_score")
    assert set(sums) == {f"{s}/{k}" for k in KINDS for s in ("gt_score", "exact", "n")}
    assert sums == kind_sums(PROMPTS[:1], SCORES[:1], "gt_score") | {
        "gt_score/add": 1.24,
        "n/add": 2.0,
        "gt_score/upper": 0.25,
        "n/upper": 1.0,
    }
    assert sums["exact/add"] == 1.0 and sums["exact/upper"] == 0.0  # "Tell me a joke." is no kind
    assert kind_sums([], [], "x") == {f"{s}/{k}": 0.0 for k in KINDS for s in ("x", "exact", "n")}


def test_kind_means_per_kind_over_that_kinds_prompts_only():
    means = kind_means(kind_sums(PROMPTS, SCORES, "judge_score"))
    assert means == pytest.approx(
        {"judge_score/add": 0.62, "exact/add": 0.5, "judge_score/upper": 0.25, "exact/upper": 0.0}
    )
    # sums of two ranks (added key by key) give the means of all their prompts
    a, b = kind_sums(PROMPTS[:2], SCORES[:2], "g"), kind_sums(PROMPTS[2:], SCORES[2:], "g")
    assert kind_means({k: a[k] + b[k] for k in a}) == pytest.approx(kind_means(kind_sums(PROMPTS, SCORES, "g")))
