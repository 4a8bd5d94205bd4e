"""`train.py -m` end to end: one W&B run per job, grouped by the sweep, tagged with the config
choices; a quiet console (no library banners, tips or repeated deprecations, no carriage
returns); the report compares the jobs on one figure."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import train_py_cmd

from lmforge.report import report
from lmforge.training import wandb_tracking


@pytest.mark.slow
def test_multirun_sweep_one_wandb_run_per_job_grouped_and_quiet(tmp_path, shared_cache):
    sweep = tmp_path / "sweep"
    cmd = train_py_cmd(
        "-m",
        "experiment=smoke",
        "model=nano",
        "logger=wandb",
        "hydra/job_logging=lmforge",
        "trainer.accelerator=cpu",
        "algo.batch_size=2",
        "algo.seq_len=16",
        "algo.val_batches=1",
        "algo.n_samples=0",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.log_every=1",
        f"data.cache_dir={shared_cache}",
        f"hydra.sweep.dir={sweep}",
        "algo.optim.lr=0.0001,0.0003",
    )
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_DATA_DIR": str(tmp_path / "wd"),
        "WANDB_CACHE_DIR": str(tmp_path / "wc"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wcfg"),
    }
    env.pop("CI", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    runs = [wandb_tracking.read_wandb_run(p) for job in ("0", "1") for p in wandb_tracking.wandb_run_files(sweep / job)]
    assert len(runs) == 2
    assert runs[0].run["id"] != runs[1].run["id"]
    assert runs[0].run["group"] == runs[1].run["group"] and runs[0].run["group"].startswith("sweep-")
    assert [r.config["algo"]["optim"]["lr"] for r in runs] == [1e-4, 3e-4]
    assert all(r.exit_code == 0 and "model:nano" in r.run["tags"] for r in runs)
    assert "algo.optim.lr=0.0003" in runs[1].config["meta"]["overrides"]

    # Quiet: lmforge's lines, not the libraries' banners, tips and repeated deprecations.
    for noise in ("GPU available", "TPU available", "💡", "LeafSpec", "anonymous", "\r", "Traceback"):
        assert noise not in out, (noise, out[-3000:])
    assert out.count("wandb sync") == 2 and "step 2/2 (100%)" in out

    written = report([sweep], tmp_path / "report")
    md = written["summary"].read_text()
    assert written["figure"].stat().st_size > 10_000
    assert "## algo.optim.lr=0.0001" in md and "## algo.optim.lr=0.0003" in md
