"""Real (tiny) runs through lmforge.run.main with W&B offline, CSV and TensorBoard at once: the
W&B run's identity and config, resume into the same run and step axis, checkpoint artifacts with
lineage, bounded sample tables, the same metric names everywhere, plain progress lines, and the
offline report. Read back from the files W&B writes (no network, no W&B service)."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from lmforge.report import main as report_main
from lmforge.run import main
from lmforge.training import wandb_tracking
from lmforge.training.checkpoint import load_checkpoint

# A nano model on 2 x 16-token batches: each step is a few milliseconds of compute.
TINY = [
    "experiment=smoke",
    "model=nano",
    "logger=[wandb,csv,tensorboard]",
    "trainer.progress_bar=plain",
    "trainer.accelerator=cpu",
    "algo.batch_size=2",
    "algo.seq_len=16",
    "algo.val_batches=1",
    "algo.n_samples=2",
    "algo.sample_tokens=4",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "logger.csv.flush_logs_every_n_steps=1",
    "logger.wandb.log_model=true",
    "logger.wandb.max_table_rows=3",
    "algo.optim.warmup_steps=1",
    "algo.optim.decay_steps=6",
    "experiment_name=tracking-test",
]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(run_dir: Path, cache: Path, *overrides: str) -> dict:
    cfg = compose_config([*TINY, *overrides], run_dir=run_dir)
    with open_dict(cfg):
        cfg.data.cache_dir = str(cache)
    return main(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    base = tmp_path_factory.mktemp("tracking")
    lines = Lines()
    ours = logging.getLogger("lmforge")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(base / "wandb-home" / var.lower()))
        mp.setenv("WANDB_MODE", "offline")
        ours.addHandler(lines)
        try:
            first = run(base / "a", shared_cache, "trainer.max_steps=4")
            ckpt_first = load_checkpoint(base / "a" / "checkpoints" / "last.ckpt")
            second = run(base / "a", shared_cache, "trainer.max_steps=6", "resume=auto")
            # A next stage from that checkpoint: its artifact records where it started.
            child = run(
                base / "b",
                shared_cache,
                "trainer.max_steps=2",
                f"init_from={first['last_checkpoint']}",
                "logger=wandb",
                "algo.n_samples=0",
            )
        finally:
            ours.removeHandler(lines)
    return {
        "base": base,
        "dir": base / "a",
        "first": first,
        "second": second,
        "child": child,
        "ckpt_first": ckpt_first,
        "lines": lines.lines,
    }


def wandb_files(run_dir: Path) -> list[wandb_tracking.WandbRunFile]:
    return [wandb_tracking.read_wandb_run(p) for p in wandb_tracking.wandb_run_files(run_dir)]


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_wandb_run_identity_and_config(runs):
    first = wandb_files(runs["dir"])[0]
    assert re.fullmatch(r"pretrain-nano-synthetic-\d{8}-\d{6}", first.run["name"])
    assert first.run["group"] == "tracking-test" and first.run["job_type"] == "pretrain"
    assert {"model:nano", "algo:pretrain", "experiment:smoke"} <= set(first.run["tags"])
    # The full resolved config ...
    resolved = OmegaConf.to_container(compose_config([*TINY, "trainer.max_steps=4"], run_dir=runs["dir"]), resolve=True)
    for key in ("model", "algo", "trainer", "strategy"):
        assert first.config[key] == resolved[key], key
    assert first.config["data"]["n_docs"] == resolved["data"]["n_docs"]
    # ... and what else produced the run.
    meta = first.config["meta"]
    assert re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"]) and "dirty" in meta["git"]
    assert meta["world_size"] == 1 and meta["versions"]["lightning"] and meta["command"]
    assert meta["choices"]["model"] == "nano"


def test_resume_continues_the_same_run_and_step_axis(runs):
    files = wandb_files(runs["dir"])
    assert len(files) == 2, [f.path for f in files]
    first, second = files
    assert second.run["id"] == first.run["id"] == runs["ckpt_first"].raw[wandb_tracking.CHECKPOINT_KEY]["id"]
    assert second.run["name"] == first.run["name"] and second.run["group"] == first.run["group"]
    assert first.exit_code == 0 and second.exit_code == 0
    steps = first.steps + second.steps
    assert steps == sorted(set(steps)), steps  # no step twice, none backwards
    assert min(second.steps) > max(first.steps)
    for h in first.history + second.history:
        if "trainer/global_step" in h:
            assert h["trainer/global_step"] == h["_step"]
    # The resumed run carries on to the end: train/loss at every step of the axis, 0 .. 5.
    train_steps = [h["_step"] for h in first.history + second.history if "train/loss" in h]
    assert train_steps == list(range(6))
    # The CSV continues too (Lightning's logger would have started a new file).
    assert [int(r["step"]) for r in csv_rows(runs["dir"]) if r["train/loss"]] == list(range(6))
    summary = json.loads((runs["dir"] / "summary.json").read_text())
    assert len(summary["attempts"]) == 2 and summary["global_step"] == 6


def test_checkpoints_become_artifacts_with_lineage(runs):
    arts = [a for f in wandb_files(runs["dir"]) for a in f.artifacts if a["type"] == "model"]
    assert len(arts) == 2  # one per successful fit
    assert arts[-1]["metadata"]["global_step"] == 6 and arts[-1]["metadata"]["stage"] == "pretrain"
    assert set(arts[-1]["files"]) == {"last.ckpt", "best.ckpt"}
    parent_id = runs["ckpt_first"].raw[wandb_tracking.CHECKPOINT_KEY]["id"]
    (child,) = wandb_files(runs["base"] / "b")
    (art,) = [a for a in child.artifacts if a["type"] == "model"]
    assert art["metadata"]["lineage"] == {"init_from": runs["first"]["last_checkpoint"]}
    assert art["metadata"]["lineage_runs"]["init_from"]["id"] == parent_id
    assert art["metadata"]["lineage_runs"]["init_from"]["artifact"] == f"pretrain-{parent_id}" == arts[-1]["name"]
    assert child.run["id"] != parent_id and child.run["group"] == "tracking-test"


def test_sample_tables_are_bounded(runs):
    run_dir = next(p.parent for p in wandb_tracking.wandb_run_files(runs["dir"]))
    tables = sorted((run_dir / "files" / "media" / "table").glob("samples_*.table.json"))
    assert tables
    for t in tables:
        assert len(json.loads(t.read_text())["data"]) <= 3
    assert len((runs["dir"] / "samples.jsonl").read_text().splitlines()) == 6  # all of them on disk


def test_same_metric_names_in_every_logger(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    not_metrics = {"epoch", "step", "trainer/global_step"}
    w = {
        k
        for f in wandb_files(runs["dir"])
        for h in f.history
        for k in h
        if not k.startswith("_") and not k.startswith("samples") and k not in not_metrics
    }
    c = set(csv_rows(runs["dir"])[0].keys()) - not_metrics
    ea = EventAccumulator(str(runs["dir"] / "tensorboard"))
    ea.Reload()
    t = set(ea.Tags()["scalars"]) - not_metrics
    assert w == c == t and {"train/loss", "val/loss", "perf/tokens_per_s"} <= w


def test_progress_lines_and_quiet_console(runs):
    text = "\n".join(runs["lines"])
    assert "\r" not in text
    steps = [ln for ln in runs["lines"] if ln.startswith("step ")]
    assert any(re.match(r"step 2/4 \(50%\) \| train/loss [\d.]+ \| .*tok/s \| .*s/step \| ETA ", ln) for ln in steps)
    assert any(ln.startswith("val @ step 2 | ") and "val/loss" in ln for ln in runs["lines"])
    assert "wandb sync" in text and runs["second"]["metrics"]["val/loss"] > 0


def test_report_from_a_real_run(runs, tmp_path, capsys):
    assert report_main([str(runs["dir"]), str(runs["base"] / "b"), "--out", str(tmp_path)]) == 0
    png, md = tmp_path / "report.png", tmp_path / "report.md"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    # The final metrics are metrics.csv's last values.
    last: dict[str, str] = {}
    for r in csv_rows(runs["dir"]):
        last.update({k: v for k, v in r.items() if v and k not in ("epoch", "step")})
    table = {
        ln.split("|")[1].strip(): ln.split("|")[2].strip()
        for ln in text.splitlines()
        if ln.startswith("| ") and not ln.startswith("| metric")
    }
    for k in ("train/loss", "val/loss", "val/bpb", "train/lr"):
        assert float(table[k].split()[0]) == pytest.approx(float(last[k]), rel=1e-5), k
    assert "model=nano" in text and "checkpoints/last.ckpt" in text and "(2 attempts)" in text
