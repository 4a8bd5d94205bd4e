"""Every supervised stage and PPO on two ranks on CPU (gloo), under DDP and FSDP, in bf16-mixed and fp32.

Pretraining under DDP/FSDP in fp32 is covered step for step in test_strategies.py; here each stage
runs two steps on two ranks (the later stages from the small policy/reward checkpoints of the RL
tests) with fused AdamW, and must finish with one checkpoint of its stage, loadable in one
process, and one metrics file. SFT and reward share the supervised path (StageModule, automatic
optimization), so each takes one strategy and the pair covers both; DPO (automatic optimization,
a frozen reference, held-out generation) takes both; pretraining and PPO (manual
optimization, generation, frozen models) take both, PPO in both precisions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algos"))  # the shared RL helpers

from dist_helpers import read_metrics, run_train  # noqa: E402
from test_rollout import build_rl_assets  # noqa: E402

from lmforge.training.checkpoint import load_checkpoint  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = [
    "model=nano",
    "logger=csv",
    "trainer.progress_bar=none",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "data.n_docs=2000",
    "trainer.max_steps=2",
    "trainer.eval_every=2",
    "trainer.log_every=1",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


def stage_overrides(stage: str, assets: dict) -> list[str]:
    init = [f"init_from={assets['policy']}", f"data.cache_dir={assets['cache']}"]
    if stage == "pretrain":
        return [
            f"data.cache_dir={assets['cache']}",
            "algo.batch_size=4",
            "algo.seq_len=32",
            "algo.val_batches=1",
            "algo.n_samples=0",
        ]
    if stage == "sft":
        return [
            *init,
            "algo=sft",
            "data.n_sft=200",
            "algo.batch_size=4",
            "algo.val_batches=1",
            "algo.eval_prompts=4",
            "algo.max_new_tokens=4",
        ]
    if stage == "reward":
        return [*init, "algo=reward", "data.n_pairs=200", "algo.batch_size=4", "algo.val_batches=1"]
    if stage == "dpo":
        return [
            *init,
            "algo=dpo",
            "data.n_pairs=200",
            "algo.batch_size=4",
            "algo.val_batches=1",
            "algo.eval_prompts=4",
            "algo.max_new_tokens=4",
            "algo.n_samples=1",
        ]
    return [
        *init,
        "algo=ppo",
        f"algo.reward.model={assets['reward']}",
        "algo.rollout_batch_size=4",
        "algo.minibatch_size=4",
        "algo.micro_batch_size=2",
        "algo.max_new_tokens=4",
        "algo.eval_max_new_tokens=4",
        "algo.eval_prompts=4",
        "algo.eval_batch_size=4",
        "algo.n_samples=1",
    ]


# bf16-mixed with fused AdamW (what `auto` picks on GPUs and bf16 CPUs) for every stage under
# each strategy, fp32 for PPO (manual optimization, generation, frozen models) under both.
@pytest.mark.parametrize(
    ("stage", "strategy", "precision"),
    [
        ("pretrain", "ddp", "bf16-mixed"),
        ("pretrain", "fsdp", "bf16-mixed"),
        ("sft", "fsdp", "bf16-mixed"),
        ("reward", "ddp", "bf16-mixed"),
        ("dpo", "ddp", "bf16-mixed"),
        ("dpo", "fsdp", "bf16-mixed"),
        ("ppo", "ddp", "bf16-mixed"),
        ("ppo", "fsdp", "bf16-mixed"),
        ("ppo", "fsdp-bf16-params", "bf16-mixed"),
        ("ppo", "ddp", "32-true"),
        ("ppo", "fsdp", "32-true"),
    ],
)
def test_stage_runs_on_two_ranks(tmp_path, assets, stage, strategy, precision):
    run = tmp_path / "run"
    # fsdp-bf16-params: FSDP2 computes with bf16 parameters (what strategy.mixed_precision=auto picks
    # on GPUs), so rollouts run on bf16 weights. PPO under FSDP in bf16 uses the static-shape KV
    # cache (index_copy_ refuses a dtype mismatch that a slice assignment would silently cast).
    extra = []
    if strategy.startswith("fsdp") and stage == "ppo" and precision == "bf16-mixed":
        extra.append("algo.static_cache=true")
    if strategy == "fsdp-bf16-params":
        extra.append("strategy.mixed_precision=bf16")
    run_train(
        *COMMON,
        *stage_overrides(stage, assets),
        f"strategy={strategy.split('-')[0]}",
        *extra,
        f"hydra.run.dir={run}",
        f"trainer.precision={precision}",
        "algo.optim.impl=fused",
    )
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt.stage == stage and ckpt.raw["global_step"] == 2
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1  # rank zero only
    rows = read_metrics(run)
    keys = {k for r in rows for k, v in r.items() if v}
    expected = {
        "pretrain": "val/loss",
        "sft": "val/loss",
        "reward": "val/accuracy",
        "dpo": "val/kl",
        "ppo": "rollout/reward_mean",
    }[stage]
    assert expected in keys, sorted(keys)
    if stage == "ppo":
        # Statistics reduced over both ranks' rollouts: 2 ranks x 4 responses.
        assert "train/world_size" in keys and {
            float(r["train/world_size"]) for r in rows if r.get("train/world_size")
        } == {2.0}
