"""Helpers of the multi-process tests (not a conftest: tests/conftest.py owns that name on sys.path)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import train_py_cmd

ROOT = Path(__file__).resolve().parents[2]

# A nano model, a few steps, validation on 8 fixed windows; no text samples.
TINY = [
    "experiment=smoke",
    "logger=csv",
    "trainer.progress_bar=none",
    "trainer.accelerator=cpu",
    "algo.n_samples=0",
    "algo.optim.warmup_steps=2",
    "algo.optim.decay_steps=8",
    "data.n_docs=500",
    "trainer.log_every=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "MASTER_ADDR",
            "MASTER_PORT",
            "NODE_RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "RANK",
            "GROUP_RANK",
            "LOCAL_WORLD_SIZE",
            "TORCHELASTIC_RUN_ID",
            "SLURM_NTASKS",
            "SLURM_PROCID",
            "SLURM_JOB_NAME",
            "PL_GLOBAL_SEED",
        )
    }
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def train_cmd(*overrides: str) -> list[str]:
    return train_py_cmd(*overrides)


def run_train(
    *overrides: str, timeout: int = 300, env: dict | None = None, cwd: Path = ROOT, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(*overrides), cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, failure_report(proc)
    return proc


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """What a failed multi-process run printed, for the assertion message. Every rank writes to the
    same stdout/stderr, so the rank that died first is often not the one whose error ends the
    output: each traceback is shown whole (the first 6000 characters of each), then the tails."""
    out = proc.stdout + proc.stderr
    tracebacks = [out[i : i + 6000] for i in _starts(out, "Traceback (most recent call last)")]
    return (
        "\n".join(f"--- traceback {n + 1} of {len(tracebacks)} ---\n{t}" for n, t in enumerate(tracebacks))
        + "\n--- stdout tail ---\n"
        + proc.stdout[-3000:]
        + "\n--- stderr tail ---\n"
        + proc.stderr[-3000:]
    )


def _starts(text: str, needle: str) -> list[int]:
    found, i = [], text.find(needle)
    while i >= 0:
        found.append(i)
        i = text.find(needle, i + 1)
    return found


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.fixture(scope="session")
def dist_cache(tmp_path_factory) -> Path:
    """Token cache shared by the distributed tests, built once by a single process (ranks that
    find a cold cache would all build it)."""
    return tmp_path_factory.mktemp("dist-cache")
