"""Helpers of the reliability tests: tiny runs (nano model, few steps) in-process or as train.py
subprocesses, and reading their metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import compose_config, train_py_cmd  # noqa: E402  (tests/ on sys.path first)

# A few seconds a run: nano model, 4 x 32-token micro-batches, a 1-batch validation, no samples,
# every step logged and flushed (so a killed run's metrics are on disk up to the kill).
TINY = [
    "experiment=smoke",
    "logger=csv",
    "trainer.progress_bar=none",
    "algo.batch_size=4",
    "algo.seq_len=32",
    "algo.val_batches=1",
    "algo.n_samples=0",
    "algo.optim.warmup_steps=2",
    "trainer.log_every=1",
    "logger.csv.flush_logs_every_n_steps=1",
]


def tiny_cfg(run_dir: Path, cache: Path, *overrides: str):
    cfg = compose_config([*TINY, *overrides], run_dir=run_dir)
    with open_dict(cfg):
        cfg.data.cache_dir = str(cache)
    return cfg


def subprocess_env() -> dict:
    # One thread: the same kernels (so the same bits) in every run, and fair to a shared machine.
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }


def launch(run_dir: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    """`python train.py <TINY> <overrides>` into run_dir, run from run_dir's parent (nothing lands
    in the repository); output in run_dir.parent/<name>.log."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115 (the child writes it)
    return subprocess.Popen(
        train_py_cmd(*TINY, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides),
        cwd=run_dir.parent,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def output_of(run_dir: Path) -> str:
    p = run_dir.parent / f"{run_dir.name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "csv" / "metrics.csv"


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a CSV (a process killed mid-write may leave half a last line)."""
    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(text.splitlines()))


def losses(rows: list[dict], key: str = "train/loss") -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def logged_step(run_dir: Path) -> int:
    """The highest step with a train/loss row in the run's metrics.csv (-1: none yet)."""
    try:
        return max((s for s, _ in losses(read_rows(metrics_path(run_dir)))), default=-1)
    except (OSError, ValueError, csv.Error):  # caught mid-write
        return -1


def signal_at_steps(plan: list[tuple[subprocess.Popen, Path, int, int]], timeout: float = 300) -> dict:
    """For each (process, run_dir, step, signal): send the signal as soon as its metrics.csv
    shows a train/loss row with a step >= `step`. Returns {run_dir: logged step at the signal}."""
    pending, sent = list(plan), {}
    deadline = time.monotonic() + timeout
    while pending:
        for item in list(pending):
            proc, run_dir, step, sig = item
            if proc.poll() is not None:
                raise AssertionError(
                    f"{run_dir} ended (rc={proc.returncode}) before step {step}:\n" + output_of(run_dir)[-3000:]
                )
            seen = logged_step(run_dir)
            if seen >= step:
                proc.send_signal(sig)
                sent[run_dir] = seen
                pending.remove(item)
        if time.monotonic() > deadline:
            for proc, *_ in pending:
                proc.kill()
            raise AssertionError(f"runs did not reach their steps in {timeout}s: {[str(p[1]) for p in pending]}")
        time.sleep(0.03)
    return sent


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{run_dir} did not finish in {timeout}s:\n" + output_of(run_dir)[-3000:]) from None


def trained_run(tmp_path_factory, cache: Path, name: str = "trained", *overrides: str) -> Path:
    """A finished in-process tiny run (6 steps, checkpoints at 2, 4, 6), made once per session
    (kept on disk under the session's temporary folder) and shared read-only by the tests."""
    import torch

    from lmforge.run import main

    run_dir = tmp_path_factory.getbasetemp() / f"reliability-{name}"
    if not (run_dir / "checkpoints" / "last.ckpt").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            main(tiny_cfg(run_dir, cache, "trainer.max_steps=6", "trainer.eval_every=2", *overrides))
        finally:
            torch.set_num_threads(threads)
    return run_dir


class LightningLog:
    """Collects what rank_zero_info/warn and lmforge's own loggers print (the `lightning.pytorch`
    logger does not propagate to the root logger, so pytest's caplog misses it)."""

    def __init__(self):
        import logging

        self.lines: list[str] = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer.lines.append(record.getMessage())

        self.handler = _Handler(level=logging.DEBUG)
        self.loggers = [logging.getLogger("lightning.pytorch"), logging.getLogger("lmforge")]
        self.levels: list[int] = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self):
        import logging

        for logger in self.loggers:
            self.levels.append(logger.level)
            logger.addHandler(self.handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for logger, level in zip(self.loggers, self.levels):
            logger.removeHandler(self.handler)
            logger.setLevel(level)


import pytest  # noqa: E402  (the fixtures below use it; the helpers above do not)


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like the train.py subprocesses (OMP_NUM_THREADS=1): the
    same kernels, and no oversubscription of a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
