"""Win rate of one policy over another: counting, the bootstrap interval (by hand, against the exact
bootstrap distribution and the normal approximation), the per-kind split, the referees, and
`python -m lmforge.winrate` end to end on nano checkpoints."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, compose_config

from lmforge.errors import UsageError
from lmforge.eval.winrate import (
    JudgeReferee,
    _quantiles,
    bootstrap_ci,
    by_kind,
    compare_scores,
    head_to_head,
    prompt_outcomes,
    score_pairs,
    summarize,
    task_kind,
    win_rate,
)

# ============================================================================ counting


def test_compare_scores_counts_strict_wins_ties_and_losses():
    assert compare_scores([1.0, 0.5, 0.2, 0.3], [0.5, 0.5, 0.3, 0.3]) == (1, 2, 1)
    assert compare_scores([1.0, 0.6], [0.0, 0.0]) == (2, 0, 0)  # all wins
    assert compare_scores([], []) == (0, 0, 0)
    with pytest.raises(ValueError, match="2 scores for A but 1 for B"):
        compare_scores([1, 2], [1])


def test_win_rate_counts_a_tie_as_half():
    assert win_rate(1, 2, 1) == 0.5
    assert win_rate(2, 0, 0) == 1.0 and win_rate(0, 0, 3) == 0.0
    assert win_rate(3, 1, 0) == pytest.approx(3.5 / 4)
    assert win_rate(0, 5, 0) == 0.5  # all ties: even
    with pytest.raises(ValueError, match="at least one comparison"):
        win_rate(0, 0, 0)


def test_prompt_outcomes_keep_a_prompts_samples_together():
    # prompt 0: a win and a tie -> 3/4; prompt 1: a tie and a loss -> 1/4
    assert prompt_outcomes([1, 0, 0.5, 0.5], [0, 0, 0.5, 1], samples_per_prompt=2) == [0.75, 0.25]
    assert prompt_outcomes([1, 0], [0, 1]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a whole number of prompts"):
        prompt_outcomes([1, 0, 1], [0, 0, 0], samples_per_prompt=2)


# ======================================================================= the interval


def test_quantiles_interpolate_between_order_statistics():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    # position p * (n - 1): 0.5 -> 1.5 (between 1 and 2); 0.025 -> 0.075 (between 0 and 1)
    assert _quantiles(x, (0.5, 0.025, 1.0, 0.0)) == pytest.approx([1.5, 0.075, 3.0, 0.0])
    assert _quantiles(x, (0.3,)) == pytest.approx(np.quantile(x, 0.3))


def test_bootstrap_of_two_prompts_by_hand():
    """Prompts won and lost: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so
    the 2.5% and 97.5% quantiles are 0 and 1 (each end holds far more than 2.5%)."""
    assert bootstrap_ci([1.0, 0.0]) == (0.0, 1.0)


def test_identical_prompts_give_a_point_interval():
    assert bootstrap_ci([0.5] * 30) == (0.5, 0.5)
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    """The slow reference: all 4**4 equally likely resamples of four prompts, enumerated. The
    Monte Carlo quantiles must fall between the exact ones 1 percentage point either side."""
    values = [1.0, 0.5, 0.0, 0.0]
    exact = sorted(sum(values[i] for i in idx) / 4 for idx in itertools.product(range(4), repeat=4))

    def q(p):  # the exact distribution's p-quantile (lower)
        return exact[math.ceil(p * len(exact)) - 1]

    for confidence in (0.95, 0.8):
        tail = (1 - confidence) / 2
        low, high = bootstrap_ci(values, resamples=20_000, confidence=confidence, seed=3)
        assert q(tail - 0.01) <= low <= q(tail + 0.01)
        assert q(1 - tail - 0.01) <= high <= q(1 - tail + 0.01)


def test_bootstrap_matches_the_normal_approximation_with_many_prompts():
    """400 prompts, 60% won: p +- 1.96 * sqrt(p (1 - p) / n) = 0.6 +- 0.048."""
    values = [1.0] * 240 + [0.0] * 160
    half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    low, high = bootstrap_ci(values, resamples=4000)
    assert low == pytest.approx(0.6 - half, abs=0.01) and high == pytest.approx(0.6 + half, abs=0.01)


def test_interval_contains_the_estimate_narrows_with_more_prompts_and_is_seeded():
    rng = np.random.default_rng(0)
    a, b = rng.random(50).round(1).tolist(), rng.random(50).round(1).tolist()
    s = summarize(a, b)
    assert s["ci_low"] <= s["win_rate"] <= s["ci_high"] and s["ci_low"] < s["ci_high"]
    four_times = summarize(a * 4, b * 4)  # the same win rate on 4x the prompts
    assert four_times["win_rate"] == pytest.approx(s["win_rate"])
    width, width4 = s["ci_high"] - s["ci_low"], four_times["ci_high"] - four_times["ci_low"]
    assert width4 < 0.6 * width  # ~1/2: the width shrinks as 1/sqrt(n)
    assert summarize(a, b, seed=7) == summarize(a, b, seed=7)
    # the seed is the only source of randomness: fixed, the interval is too; another one moves it
    values = rng.random(50).tolist()
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_swapping_the_policies_mirrors_rate_and_interval():
    a, b = [0.1, 0.9, 0.5, 0.7, 0.2, 1.0], [0.3, 0.4, 0.5, 0.1, 0.2, 0.0]
    ab, ba = summarize(a, b), summarize(b, a)
    assert (ab["wins"], ab["ties"], ab["losses"]) == (ba["losses"], ba["ties"], ba["wins"])
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert ab["ci_low"] == pytest.approx(1 - ba["ci_high"]) and ab["ci_high"] == pytest.approx(1 - ba["ci_low"])


def test_bad_interval_options_are_usage_errors():
    with pytest.raises(UsageError, match="confidence=1.5 must be in"):
        bootstrap_ci([1.0], confidence=1.5)
    with pytest.raises(UsageError, match="resamples=0"):
        bootstrap_ci([1.0], resamples=0)


# ========================================================================= per kind


def test_summaries_per_task_kind():
    prompts = ["What is 2 + 3?", "Uppercase: lemon", "What is 7 + 1?", "Tell me a story"]
    kinds = [task_kind(p) for p in prompts]
    assert kinds == ["add", "upper", "add", None]
    # two samples per prompt, prompt-major
    a = [1.0, 0.6, 0.25, 0.25, 0.0, 1.0, 0.3, 0.1]
    b = [0.6, 0.6, 0.60, 0.25, 1.0, 1.0, 0.1, 0.3]
    out = by_kind(kinds, a, b, samples_per_prompt=2)
    assert sorted(out) == ["add", "upper"]  # the story has no kind
    add = out["add"]  # (1 vs .6 win, .6 vs .6 tie), (0 vs 1 loss, 1 vs 1 tie)
    assert (add["n"], add["wins"], add["ties"], add["losses"], add["win_rate"]) == (2, 1, 2, 1, 0.5)
    assert add["mean_score_a"] == pytest.approx((1 + 0.6 + 0 + 1) / 4)
    upper = out["upper"]  # .25 vs .6 loss, .25 vs .25 tie
    assert (upper["n"], upper["wins"], upper["ties"], upper["losses"], upper["win_rate"]) == (1, 0, 1, 1, 0.25)


def test_head_to_head_with_the_judge_by_hand():
    prompts = ["What is 2 + 3?", "Uppercase: lemon", "What comes after 9?"]
    # 5 is right (1.0) vs 6 one off (0.3 * (1 - 1/5) = 0.24); both right; 11 (0.3 * 4/5) vs 10 (1.0)
    result, records = head_to_head(prompts, [" 5", " LEMON", " 11"], [" 6", " LEMON", " 10"], JudgeReferee())
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (1, 1, 1, 3)
    assert result["win_rate"] == 0.5
    assert result["mean_score_a"] == pytest.approx((1 + 1 + 0.24) / 3)
    assert result["mean_score_b"] == pytest.approx((0.24 + 1 + 1) / 3)
    assert {k: v["win_rate"] for k, v in result["by_kind"].items()} == {"add": 1.0, "upper": 0.5, "next": 0.0}
    assert records[0] == {
        "prompt": "What is 2 + 3?",
        "kind": "add",
        "response_a": " 5",
        "response_b": " 6",
        "score_a": 1.0,
        "score_b": 0.24,
    }


def test_the_judge_refuses_prompts_it_cannot_parse():
    JudgeReferee().check(["What is 2 + 3?", "User: Uppercase: lemon\nAssistant:"])
    with pytest.raises(UsageError, match=r"prompt 2 \('Tell me a story'\) is not one"):
        JudgeReferee().check(["What is 2 + 3?", "Tell me a story"])


def test_identical_responses_are_scored_once_so_they_tie():
    calls = []

    def noisy_referee(prompts, responses):  # a different float per call position, like padding noise
        calls.append(list(zip(prompts, responses)))
        return [len(calls) + i * 1e-7 for i in range(len(prompts))]

    a, b = score_pairs(noisy_referee, ["p", "q", "p"], ["x", "y", "x"], ["x", "z", "w"])
    assert calls == [[("p", "x"), ("q", "y"), ("q", "z"), ("p", "w")]]  # distinct pairs, in order
    assert a[0] == b[0] == a[2] and a[1] != b[1]


# ============================================================== the command, end to end


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Two nano policies with different (untrained) weights and a nano reward model, written as
    the stages write them; sampling and scoring only need the shapes and the tokenizer."""
    import torch

    from lmforge.algos.pretrain import PretrainModule
    from lmforge.algos.reward import RewardModule
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.world.generator import SyntheticWorld

    base = tmp_path_factory.mktemp("winrate-ckpts")
    tok = train_tokenizer(SyntheticWorld(0).pretrain_documents(300), 512, base / "cache")
    out = {}
    for name, algo, seed in (("a", "pretrain", 1), ("b", "pretrain", 2), ("reward", "reward", 1)):
        torch.manual_seed(seed)
        cfg = compose_config(
            ["experiment=smoke", f"algo={algo}", "logger=none", f"data.cache_dir={base / 'cache'}"], run_dir=base / name
        )
        module = (PretrainModule if algo == "pretrain" else RewardModule)(cfg, tok)
        out[name] = base / f"{name}.ckpt"
        torch.save({"state_dict": module.state_dict(), "lmforge": module.checkpoint_metadata()}, out[name])
    return out


def test_a_checkpoint_against_itself_ties_everywhere(ckpts, capsys):
    from lmforge.winrate import main

    result = main([f"a={ckpts['a']}", f"b={ckpts['a']}", "prompts=synthetic:test:12"])
    assert (result["n"], result["wins"], result["ties"], result["losses"]) == (12, 0, 12, 0)
    assert (result["win_rate"], result["ci_low"], result["ci_high"]) == (0.5, 0.5, 0.5)
    assert result["mean_score_a"] == result["mean_score_b"] and result["referee"] == "judge"
    assert sum(k["n"] for k in result["by_kind"].values()) == 12
    out, err = capsys.readouterr()
    assert json.loads(out) == result
    assert err.startswith("A wins 50.0% (ties half; 95% CI 50.0-50.0%) over B on 12 prompts: 0 wins, 12 ties")


def test_two_checkpoints_under_a_reward_model(ckpts, tmp_path, capsys):
    """Sampled responses (temperature 1, two per prompt), scored by the reward model as
    `lmforge.score` would score them; swapping a and b mirrors the result."""
    from lmforge.eval.reward_scoring import RewardScorer
    from lmforge.winrate import main

    common = ["prompts=synthetic:test:8", f"referee={ckpts['reward']}", "temperature=1", "n=2", "max_new_tokens=6"]
    ab = main([f"a={ckpts['a']}", f"b={ckpts['b']}", *common, f"out={tmp_path / 'ab.json'}"])
    ba = main([f"a={ckpts['b']}", f"b={ckpts['a']}", *common])
    capsys.readouterr()
    assert ab["n"] == 8 and ab["samples_per_prompt"] == 2 and ab["wins"] + ab["ties"] + ab["losses"] == 16
    assert ab["wins"] > 0 and ab["losses"] > 0  # different weights, real rewards
    assert (ab["wins"], ab["losses"]) == (ba["losses"], ba["wins"])
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert ab["ci_low"] <= ab["win_rate"] <= ab["ci_high"]
    saved = json.loads((tmp_path / "ab.json").read_text())
    comparisons = saved.pop("comparisons")
    assert saved == ab and len(comparisons) == 16
    assert sum(c["score_a"] > c["score_b"] for c in comparisons) == ab["wins"]
    scorer = RewardScorer(ckpts["reward"])
    for c in comparisons[:4]:
        expected = scorer.score(c["prompt"], c["response_a"].removeprefix(" "))
        assert c["score_a"] == pytest.approx(expected, abs=1e-4)


def test_the_reward_model_referee_renders_as_lmforge_score(ckpts):
    """The policy writes the response prefix itself (" 5" after "Assistant:"): it is not doubled."""
    from lmforge.eval.reward_scoring import RewardScorer
    from lmforge.eval.winrate import make_referee

    referee = make_referee(str(ckpts["reward"]))
    assert referee.name == str(ckpts["reward"])
    with_prefix, without = referee(["What is 2 + 3?"] * 2, [" 5", "5"])
    assert with_prefix == pytest.approx(without, abs=1e-5)
    assert without == pytest.approx(RewardScorer(ckpts["reward"]).score("What is 2 + 3?", "5"), abs=1e-5)


def test_user_errors_are_one_line_with_exit_status_2(ckpts, tmp_path, capsys, monkeypatch):
    from lmforge.winrate import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["winrate", *args])
        status = cli()
        return status, capsys.readouterr().err

    a = f"a={ckpts['a']}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a story\n")
    for args, message in (
        ((f"a={ckpts['reward']}", f"b={ckpts['a']}"), "error: a: ckpt="),  # a reward model as a policy
        ((a, f"b={tmp_path / 'missing.ckpt'}"), "b: " + f"{tmp_path / 'missing.ckpt'}: no such checkpoint file"),
        ((a, f"b={ckpts['a']}", f"referee={ckpts['a']}"), "error: referee: "),  # a policy as the referee
        ((a, f"b={ckpts['a']}", f"prompts={prompts}"), "referee=judge scores synthetic-world prompts only"),
        ((a, f"b={ckpts['a']}", "bogus=1"), "unknown option 'bogus'; options: a, b, prompts"),
        ((a, f"b={ckpts['a']}", "prompts=synthetic:train"), "use synthetic:test or synthetic:val"),
        ((a, f"b={ckpts['a']}", "n=2"), "set temperature > 0"),
        ((a,), "give b=<checkpoint>"),
    ):
        status, err = run(*args)
        assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    status, err = run(f"a={ckpts['reward']}", f"b={ckpts['a']}")
    assert "'reward' checkpoint" in err


def test_the_command_line(ckpts):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    def winrate(*args):
        cmd = [sys.executable, "-m", "lmforge.winrate", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = winrate("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Held-out win rate of one checkpoint over another")
    proc = winrate(f"a={ckpts['a']}", f"b={ckpts['b']}", "prompts=synthetic:val:5", "max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["n"] == 5 and result["prompts"] == "synthetic:val:5"
    assert proc.stderr.strip().splitlines()[-1].startswith("A wins ")
    proc = winrate(f"a={ckpts['a']}", f"b={ckpts['b']}", "temperature=oops")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and not proc.stdout
