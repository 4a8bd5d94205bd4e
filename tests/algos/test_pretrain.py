"""Pretraining: the loss falls, train.py runs end to end, and resume continues where it stopped."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_py_cmd

from lmforge.run import main
from lmforge.training.checkpoint import load_checkpoint

SMOKE = ["experiment=smoke", "logger=csv", "trainer.progress_bar=none"]


def train_py(*overrides: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        train_py_cmd(*overrides),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_loss_falls_on_synthetic(make_cfg, shared_cache):
    cfg = make_cfg(
        *SMOKE, "trainer.max_steps=40", "trainer.eval_every=20", "algo.optim.warmup_steps=5", cache=shared_cache
    )
    result = main(cfg)
    losses = column(read_metrics(Path(cfg.run_dir)), "train/loss")
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 1.0, losses  # from ~ln(512)=6.2 at init, a clear drop
    assert result["metrics"]["val/bpb"] > 0
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt.stage == "pretrain" and ckpt.raw["global_step"] == 40


@pytest.mark.slow
def test_train_py_end_to_end_and_resume(tmp_path, shared_cache):
    common = [
        *SMOKE,
        f"data.cache_dir={shared_cache}",
        "trainer.eval_every=5",
        "algo.optim.warmup_steps=2",
        "algo.optim.decay_steps=20",
    ]
    # An uninterrupted 20-step run, and a 10-step run resumed to 20 (the same LR horizon).
    full, part = tmp_path / "full", tmp_path / "part"
    out = train_py(*common, "trainer.max_steps=20", f"hydra.run.dir={full}")
    assert "checkpoint:" in out.stderr + out.stdout
    train_py(*common, "trainer.max_steps=10", f"hydra.run.dir={part}")
    first_ckpt = load_checkpoint(part / "checkpoints" / "last.ckpt")
    assert first_ckpt.raw["global_step"] == 10
    train_py(*common, "trainer.max_steps=20", f"hydra.run.dir={part}", "resume=auto")
    resumed = load_checkpoint(part / "checkpoints" / "last.ckpt")
    assert resumed.raw["global_step"] == 20
    # Same data order, RNG, LR schedule and optimizer state: the same weights as never stopping.
    reference = load_checkpoint(full / "checkpoints" / "last.ckpt")
    for k, v in reference.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[k], v, rtol=0, atol=0, msg=k)
    steps = sorted(column(read_metrics(part), "train/loss"))
    assert steps == sorted(set(steps)), "the step axis must not repeat after resume"


@pytest.mark.slow
def test_multirun_sweep_gives_one_run_folder_per_job(tmp_path, shared_cache):
    sweep = tmp_path / "sweep"
    train_py(
        "-m",
        *SMOKE,
        f"data.cache_dir={shared_cache}",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "algo.n_samples=0",
        "algo.optim.lr=1e-3,3e-4",
        f"hydra.sweep.dir={sweep}",
    )
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.ckpt")
        assert ckpt.raw["global_step"] == 3
        assert ckpt.meta["config"]["algo"]["optim"]["lr"] == lr
