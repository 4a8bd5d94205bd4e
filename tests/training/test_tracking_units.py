"""Run identity, metadata, W&B modes, the step axis, bounded tables, resumable CSV, console and
progress settings: no training, no W&B service."""

from __future__ import annotations

import csv
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from lmforge.training import console, tracking, wandb_tracking
from lmforge.training.progress import PlainProgress, RichProgress, progress_callback


def test_identity_from_the_composition(tmp_path):
    cfg = compose_config(["model=nano", "algo=pretrain", "logger=[wandb,csv]"], run_dir=tmp_path)
    assert re.fullmatch(r"pretrain-nano-synthetic-\d{8}-\d{6}", tracking.run_name(cfg))
    hydra = tracking.hydra_runtime()
    assert tracking.experiment_group(cfg, hydra) == "nano-synthetic"
    tags = tracking.run_tags(cfg, hydra)
    assert {"model:nano", "algo:pretrain", "data:synthetic"} <= set(tags)
    assert not any(t.startswith(("hydra", "logger")) for t in tags)
    # A pipeline's stages share a group through experiment_name; a -m sweep's jobs share theirs.
    cfg.experiment_name = "pipeline-7"
    assert tracking.experiment_group(cfg, hydra) == "pipeline-7"
    cfg.experiment_name = None
    sweep = {**hydra, "mode": "MULTIRUN", "sweep_dir": "outputs/multirun/2025-01-02/10-00-00-pretrain"}
    assert tracking.experiment_group(cfg, sweep) == "sweep-2025-01-02-10-00-00-pretrain"


def test_metadata_without_hydra(tmp_path, monkeypatch):
    cfg = compose_config(["model=nano"], run_dir=tmp_path)
    OmegaConf.resolve(cfg)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as in a notebook or a plain script
    assert tracking.hydra_runtime() == {} and tracking.run_tags(cfg, {}) == []
    meta = tracking.run_metadata(cfg, world_size=2)
    assert meta["world_size"] == 2 and meta["stage"] == "pretrain" and meta["group"] == "nano-synthetic"
    assert {"torch", "lightning", "wandb", "python"} <= set(meta["versions"])
    assert re.fullmatch(r"[0-9a-f]{40}", meta["git"]["commit"]) and isinstance(meta["git"]["dirty"], bool)
    assert meta["command"].startswith("python ")


def test_wandb_modes_never_prompt(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_tracking.wandb_mode("auto") == "offline"
    assert wandb_tracking.wandb_mode("online") == "offline"  # online without credentials would prompt
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_tracking.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins
    assert wandb_tracking.wandb_mode("online") == "disabled"
    cfg = compose_config(["logger=[wandb,csv]"], run_dir=tmp_path)
    loggers = tracking.build_loggers(cfg.logger, tmp_path, "x", cfg=cfg)
    assert [type(lg).__name__ for lg in loggers] == ["ResumableCSVLogger"]


class FakeRun:
    id = "abc"

    def __init__(self):
        self.calls = []

    def log(self, data, step=None):
        self.calls.append((step, dict(data)))


def fake_wandb_logger(tmp_path, **kw) -> tuple[wandb_tracking.LmforgeWandbLogger, FakeRun]:
    lg = wandb_tracking.LmforgeWandbLogger(
        name="n", project="p", save_dir=str(tmp_path), mode="offline", id="abc", **kw
    )
    lg._experiment = run = FakeRun()
    return lg, run


def test_step_axis_continues_never_repeats_or_goes_back(tmp_path):
    lg, run = fake_wandb_logger(tmp_path, resume_step=4)
    lg.log_metrics({"a": 1.0}, step=3)  # the resumed run already has steps <= 4
    lg.log_metrics({"a": 1.0}, step=4)
    assert run.calls == []
    lg.log_metrics({"a": 2.0}, step=6)
    lg.log_metrics({"b": 3.0}, step=6)  # same step: the same row
    lg.log_metrics({"c": 4.0}, step=5)  # late: kept on the current row, not dropped by W&B
    assert run.calls == [
        (6, {"a": 2.0, "trainer/global_step": 6}),
        (6, {"b": 3.0, "trainer/global_step": 6}),
        (6, {"c": 4.0}),
    ]
    assert lg.tracking_state()["step"] == 6 and lg.tracking_state()["id"] == "abc"


def test_sample_tables_keep_the_newest_rows(tmp_path):
    lg, run = fake_wandb_logger(tmp_path, max_table_rows=3)
    lg.log_metrics({"a": 1.0}, step=2)
    lg.log_samples("samples", [{"step": 2, "prompt": f"p{i}", "sample": f"s{i}"} for i in range(2)])
    lg.log_samples("samples", [{"step": 7, "prompt": f"q{i}", "sample": f"t{i}", "reward": 0.5} for i in range(2)])
    step, data = run.calls[-1]
    table = data["samples"]
    assert step == 2  # a table does not move the step axis
    assert table.columns == ["step", "prompt", "sample", "reward"]
    assert [r[1] for r in table.data] == ["p1", "q0", "q1"] and table.data[0][3] is None
    # Right after a resume, a table goes on the first new step, not on one the resumed run has.
    lg, run = fake_wandb_logger(tmp_path, resume_step=4)
    lg.log_samples("rollouts", [{"step": 5, "prompt": "p", "sample": "s"}])
    lg.log_metrics({"a": 1.0}, step=5)
    assert [c[0] for c in run.calls] == [5, 5]


def test_csv_resume_keeps_rows_before_the_checkpoint(tmp_path):
    d = tmp_path / "csv"
    d.mkdir()
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "step", "train/loss"])
        w.writeheader()
        w.writerows({"epoch": 0, "step": s, "train/loss": 10 - s} for s in range(10))
    lg = tracking.ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="", keep_below_step=5)
    lg.log_metrics({"train/loss": 0.5, "val/loss": 0.25}, step=5)
    lg.save()
    rows = list(csv.DictReader(open(d / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[-1]["val/loss"] == "0.25" and rows[0]["train/loss"] == "10"


def test_resume_state_is_read_from_the_checkpoint(tmp_path):
    p = tmp_path / "x.ckpt"
    torch.save(
        {
            "global_step": 7,
            "state_dict": {"w": torch.zeros(3)},
            wandb_tracking.CHECKPOINT_KEY: {"id": "run123", "name": "n", "group": "g", "step": 6},
        },
        p,
    )
    st = wandb_tracking.read_resume_state(p)
    assert st.global_step == 7 and st.wandb["group"] == "g"
    assert wandb_tracking.wandb_id_from_checkpoint(p) == "run123"
    torch.save({"global_step": 3}, p)
    assert wandb_tracking.wandb_id_from_checkpoint(p) is None
    assert wandb_tracking.read_resume_state(tmp_path / "missing.ckpt") is None


def test_logger_lists_compose(tmp_path):
    assert set(compose_config(["logger=[wandb,csv]"], run_dir=tmp_path).logger) == {"wandb", "csv"}
    # logger=wandb keeps csv/metrics.csv too (for lmforge.report); ~logger.csv drops it.
    assert set(compose_config(["logger=wandb"], run_dir=tmp_path).logger) == {"wandb", "csv"}
    assert set(compose_config(["logger=wandb", "~logger.csv"], run_dir=tmp_path).logger) == {"wandb"}
    assert set(compose_config(["logger=[wandb,tensorboard]"], run_dir=tmp_path).logger) == {
        "wandb",
        "csv",
        "tensorboard",
    }


def test_progress_modes(monkeypatch):
    t = OmegaConf.create({"progress_bar": "auto", "log_every": 5})
    assert isinstance(progress_callback(t), PlainProgress)  # pytest's stderr is not a terminal
    t.progress_bar = "rich"
    assert isinstance(progress_callback(t), RichProgress)
    t.progress_bar = "none"
    assert progress_callback(t) is None
    t.progress_bar = "fancy"
    with pytest.raises(ValueError, match="progress_bar"):
        progress_callback(t)


def test_console_quiets_libraries_keeps_ours():
    console.setup()
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("lmforge.run").isEnabledFor(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
            FutureWarning,
            "_pytree.py",
            21,
            module="lightning.pytorch.utilities._pytree",
        )
        warnings.warn_explicit("something else", FutureWarning, "x.py", 1, module="lightning.pytorch.x")
    assert [str(w.message) for w in seen] == ["something else"]
    fmt = console.ConsoleFormatter()
    rec = lambda name, level: logging.LogRecord(name, level, "f", 1, "hello", None, None)  # noqa: E731
    assert fmt.format(rec("lmforge.run", logging.INFO)) == "hello"
    assert fmt.format(rec("lmforge.run", logging.WARNING)) == "WARNING: hello"
    assert fmt.format(rec("wandb", logging.WARNING)) == "WARNING [wandb]: hello"


def fake_rl_run(d: Path, lr: str, scale: float) -> None:
    (d / "csv").mkdir(parents=True)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(f"- algo=ppo\n- algo.optim.lr={lr}\n")
    keys = [
        "epoch",
        "step",
        "rollout/reward_mean",
        "rollout/gt_score",
        "rollout/kl",
        "rollout/response_len",
        "val/gt_score",
        "val/loss",
    ]
    with open(d / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for s in range(6):
            w.writerow(
                {
                    "epoch": 0,
                    "step": s,
                    "rollout/reward_mean": scale * s,
                    "rollout/gt_score": 0.1 * s,
                    "rollout/kl": 0.01 * s,
                    "rollout/response_len": 6,
                }
            )
            if s % 3 == 2:
                w.writerow({"epoch": 0, "step": s, "val/gt_score": 0.2 * s, "val/loss": -0.2 * s})


def test_report_of_rl_runs_on_one_figure(tmp_path):
    from lmforge.report import find_runs, load_run, main, panels_for

    fake_rl_run(tmp_path / "sweep" / "0", "1e-5", 1.0)
    fake_rl_run(tmp_path / "sweep" / "1", "3e-5", 2.0)
    runs = [load_run(d) for d in find_runs([tmp_path / "sweep"])]
    titles = [t for t, _ in panels_for(runs)]
    # RL curves; no "Loss" panel: an RL stage's val/loss is -val/gt_score, for checkpoint selection.
    assert titles == ["Reward", "Ground-truth score", "KL to the reference", "Response length (tokens)"]
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## algo.optim.lr=1e-5" in md and "## algo.optim.lr=3e-5" in md
    assert "| rollout/reward_mean | 5 (5) | 10 (5) |" in md and "| val/gt_score | 1 (5) | 1 (5) |" in md
    assert main([str(tmp_path / "nothing-here")]) == 2
