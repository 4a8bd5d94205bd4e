"""Over-optimization, measured and held off: a KL budget that stops an RL run, an ensemble of
reward models as a conservative reward, and the gold/proxy-vs-sqrt(KL) curve of the report."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared RL helpers

from test_rollout import build_rl_assets, make_reward_checkpoint, rl_config

from lmforge.algos.rl_stage import kl_budget_spent
from lmforge.errors import ConfigError
from lmforge.report import OVEROPT_TITLE, load_run, overoptimization_curve, panels_for, report
from lmforge.run import main
from lmforge.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


def test_kl_budget_rule():
    assert not kl_budget_spent(5.0, 0.0)  # 0 = no budget
    assert not kl_budget_spent(0.5, 0.5) and kl_budget_spent(0.51, 0.5)


def test_a_kl_budget_stops_the_run_once_spent(rl_assets, tmp_path):
    """The first rollouts come from the reference itself (KL 0); once updates have moved the
    policy, a tiny budget is spent and the run ends with that iteration, well before max_steps."""
    cfg = rl_config(
        "reinforce",
        rl_assets,
        tmp_path / "run",
        f"algo.reward.model={rl_assets['reward']}",
        "trainer.max_steps=8",
        "algo.kl_budget=1e-6",
        "algo.optim.lr=1e-3",
        "logger=csv",
    )
    result = main(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    kl = {int(r["step"]): float(r["rollout/kl"]) for r in rows if r.get("rollout/kl")}
    spent = min(s for s, v in kl.items() if v > 1e-6)  # the iteration (0-based) that spent the budget
    assert max(kl) == spent and spent + 1 < 8
    assert load_checkpoint(result["last_checkpoint"]).raw["global_step"] == spent + 1


def test_a_negative_kl_budget_is_refused(rl_assets, tmp_path):
    cfg = rl_config("ppo", rl_assets, tmp_path / "run", f"algo.reward.model={rl_assets['reward']}", "algo.kl_budget=-1")
    with pytest.raises(ConfigError, match="algo.kl_budget"):
        main(cfg)


def test_an_rl_run_against_an_ensemble_logs_its_disagreement(rl_assets, tmp_path):
    tok = rl_assets["tokenizer"]
    rms = [make_reward_checkpoint(tmp_path / f"rm{k}.ckpt", tok, seed=10 + k) for k in range(2)]
    cfg = rl_config(
        "reinforce",
        rl_assets,
        tmp_path / "run",
        f"algo.reward.sources=[{{ckpt:{rms[0]}}},{{ckpt:{rms[1]}}}]",
        "algo.reward.ensemble=uwo",
        "algo.reward.ensemble_lambda=1.0",
        "logger=csv",
    )
    main(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    std = [float(r["rollout/reward/ensemble_std"]) for r in rows if r.get("rollout/reward/ensemble_std")]
    assert std and all(s > 0 for s in std)


def write_metrics(run: Path, rows: list[dict]) -> None:
    (run / "csv").mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def test_the_report_draws_gold_and_proxy_against_sqrt_kl(tmp_path):
    run = tmp_path / "ppo"
    rows = [{"step": s, "rollout/kl": 0.1 * s, "rollout/reward_mean": s} for s in range(7)]
    # validations at steps 0, 3, 6: gold rises then falls while the proxy keeps rising
    for s, kl, gold, proxy in [(0, 0.0, 0.30, -0.1), (3, 1.0, 0.40, 0.8), (6, 4.0, 0.25, 1.9)]:
        rows.append({"step": s, "val/kl": kl, "val/gt_score": gold, "val/reward": proxy})
    rows.append({"step": 6, "val/kl": "", "val/gt_score": "", "val/reward": ""})  # a row without them
    write_metrics(run, rows)
    curve = overoptimization_curve(load_run(run))
    assert curve == [(0.0, 0.30, -0.1), (1.0, 0.40, 0.8), (2.0, 0.25, 1.9)]
    assert math.isclose(max(curve, key=lambda p: p[1])[0], 1.0)  # gold peaks at sqrt(KL) = 1
    out = report([run], tmp_path / "out")
    assert out["figure"].stat().st_size > 10_000
    assert OVEROPT_TITLE not in [t for t, _ in panels_for([load_run(run)])]  # drawn as its own panel
