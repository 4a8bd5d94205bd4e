"""Experiment tracking: the loggers (conf/logger/*.yaml) and their schemas, a run's identity and
metadata, building the loggers (resuming the run a checkpoint belongs to), the run config and
summary.json, the end of a run, and sample logging. What is specific to Weights & Biases (the
mode, the W&B logger, the checkpoint entry naming a W&B run, artifacts, reading W&B run files)
is in lmforge.training.wandb_tracking.

Identity (W&B): name `<stage>-<model>-<data>-<time>` (e.g. `ppo-tiny-synthetic-20250101-120000`),
group = the experiment (`experiment_name=...`, else the Hydra sweep for `-m` jobs, else
`<model>-<data>`), job_type = the stage, tags = the config choices (`model:tiny`, `algo:ppo`, ...).
The run config is the resolved config plus `meta` (`run_metadata()`: command line, git commit and
dirty flag, package versions, world size, Hydra choices and overrides).

Resume: every checkpoint records the W&B run (`wandb_tracking.CHECKPOINT_KEY`: id, name, group,
last logged step); `build_loggers(..., resume_from=ckpt)` reads it before any logger exists and
continues that run (same id, `resume="allow"`). W&B's step is the trainer's step
(`_step == trainer/global_step`), so a resumed run continues the axis: steps at or before the
checkpoint are not logged twice, and a step is never logged backwards. The CSV logger keeps the
rows before the checkpoint (Lightning's would delete metrics.csv) and TensorBoard purges the
events after it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from lmforge.training.wandb_tracking import (
    LmforgeWandbLogger,
    ResumeState,
    TrackingCallback,
    new_run_id,
    read_resume_state,
    table_cell,
    wandb_has_credentials,
    wandb_loggers,
    wandb_mode,
)

log = logging.getLogger(__name__)

# Config groups that are not part of a run's identity (the tags and the report skip them).
_NOT_IDENTITY = ("hydra", "logger")


@dataclass
class WandbConfig:
    project: str = "lmforge"
    entity: Optional[str] = None
    # auto: online when credentials exist, else offline | online | offline | disabled
    mode: str = "auto"
    # The W&B group; default: experiment_name, else the sweep of a -m job, else <model>-<data>.
    group: Optional[str] = None
    # The W&B job type; default: the stage (algo.name).
    job_type: Optional[str] = None
    # Extra tags, after the config choices (model:tiny, algo:ppo, ...).
    tags: List[str] = field(default_factory=list)
    # Log the final last.ckpt and best.ckpt as a `model` artifact with the run's lineage.
    log_model: bool = False
    # Sample tables (samples, rollouts, eval_samples) keep at most this many newest rows.
    max_table_rows: int = 100
    # Seconds to wait for an online init before falling back to offline.
    init_timeout: float = 60.0
    # Seconds to wait for uploads at the end (0: as long as it takes); the rest stays for `wandb sync`.
    finish_timeout: float = 600.0


@dataclass
class CSVConfig:
    flush_logs_every_n_steps: int = 50


@dataclass
class TensorBoardConfig:
    pass


LOGGER_SCHEMAS = {"wandb": WandbConfig, "csv": CSVConfig, "tensorboard": TensorBoardConfig}


# ============================================================================ identity


def hydra_runtime() -> dict[str, Any]:
    """Hydra's choices, overrides, mode and sweep dir of this job; {} outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - no Hydra, or a config without the hydra node
        return {}
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        out["choices"] = {str(k): (None if v is None else str(v)) for k, v in hc.runtime.choices.items()}
    with contextlib.suppress(Exception):
        out["overrides"] = [str(o) for o in hc.overrides.task]
    with contextlib.suppress(Exception):
        out["mode"] = str(hc.mode.name) if hc.mode is not None else None
    with contextlib.suppress(Exception):
        out["sweep_dir"] = str(hc.sweep.dir)
        out["job_num"] = int(hc.job.num)
    return out


def config_choices(hydra: dict | None = None) -> dict[str, str]:
    """The config groups chosen for this run (model=tiny, algo=ppo, ...), without Hydra's own."""
    hydra = hydra_runtime() if hydra is None else hydra
    return {
        k: v
        for k, v in (hydra.get("choices") or {}).items()
        if v is not None and not any(k == g or k.startswith(g + "/") for g in _NOT_IDENTITY)
    }


def run_name(cfg, when: float | None = None) -> str:
    """`<stage>-<model>-<data>-<YYYYmmdd-HHMMSS>`, e.g. ppo-tiny-synthetic-20250101-120000."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    return f"{cfg.algo.name}-{cfg.model_name}-{cfg.data.source}-{stamp}"


def experiment_group(cfg, hydra: dict | None = None) -> str:
    """The W&B group: logger.wandb.group, else experiment_name (a pipeline's stages share it), else
    the sweep of a `-m` job (one group per sweep), else `<model>-<data>`."""
    hydra = hydra_runtime() if hydra is None else hydra
    w = (cfg.get("logger") or {}).get("wandb") or {}
    if w.get("group"):
        return str(w["group"])
    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    if hydra.get("mode") == "MULTIRUN" and hydra.get("sweep_dir"):
        parts = Path(hydra["sweep_dir"]).parts[-2:]
        return "sweep-" + "-".join(parts).replace("/", "-")
    return f"{cfg.model_name}-{cfg.data.source}"


def run_tags(cfg, hydra: dict | None = None) -> list[str]:
    """`group:choice` for every config choice (W&B caps a tag at 64 characters), then the extra tags."""
    tags = [f"{k}:{v}"[:64] for k, v in sorted(config_choices(hydra).items())]
    w = (cfg.get("logger") or {}).get("wandb") or {}
    return tags + [str(t) for t in (w.get("tags") or []) if str(t) not in tags]


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """{commit, dirty, branch} of the git checkout holding `path` (default: lmforge's source), or {}."""
    where = Path(path) if path else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {}
    info: dict[str, Any] = {"commit": commit}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        changed = git("status", "--porcelain", "--untracked-files=no")
        info["dirty"] = bool(changed)
        info["changed_files"] = len(changed.splitlines())
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
    return info


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("lmforge", "torch", "lightning", "hydra-core", "omegaconf", "wandb", "numpy", "sentencepiece"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    with contextlib.suppress(Exception):
        import torch

        if torch.version.cuda:
            out["cuda"] = torch.version.cuda
    return out


def run_metadata(cfg=None, world_size: int | None = None) -> dict[str, Any]:
    """What produced a run besides its config: command line, git, versions, world size, Hydra."""
    hydra = hydra_runtime()
    meta: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "user": _user(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_info(),
        "versions": package_versions(),
        "world_size": world_size,
        "choices": config_choices(hydra),
        "overrides": hydra.get("overrides", []),
    }
    if cfg is not None:
        meta["name"] = run_name(cfg)
        meta["group"] = experiment_group(cfg, hydra)
        meta["stage"] = cfg.algo.name
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return None


# ============================================================================ loggers


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that, resuming from a checkpoint at global step G, keeps metrics.csv's rows
    logged before G (Lightning's would delete the file) and drops the later ones (they are
    computed again), so the file holds one run without duplicate steps."""

    def __init__(self, *args: Any, keep_below_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_below_step = keep_below_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and self.keep_below_step is not None:
            from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
            from lightning.pytorch.loggers.csv_logs import ExperimentWriter

            metrics_file = Path(self.log_dir) / _FabricWriter.NAME_METRICS_FILE
            kept, keys = _csv_rows_before(metrics_file, self.keep_below_step)
            os.makedirs(self.log_dir, exist_ok=True)
            for own in (metrics_file, Path(self.log_dir) / ExperimentWriter.NAME_HPARAMS_FILE):
                # Rewritten below / by log_hyperparams; gone, Lightning's writer does not warn it "will be deleted".
                own.unlink(missing_ok=True)
            self._experiment = ExperimentWriter(log_dir=self.log_dir)
            if kept:
                self._experiment.metrics = kept
                self._experiment.save()
            self._experiment.metrics_keys = sorted(set(self._experiment.metrics_keys) | set(keys))
            return self._experiment
        return CSVLogger.experiment.fget(self)


def _csv_rows_before(path: Path, step: int) -> tuple[list[dict], list[str]]:
    import csv

    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        keys = list(reader.fieldnames or [])
        rows = []
        for r in reader:
            try:
                if int(float(r.get("step") or 0)) < step:
                    rows.append({k: v for k, v in r.items() if v not in ("", None)})
            except ValueError:
                continue
    return rows, keys


def build_loggers(
    logger_cfg, run_dir: Path, run_name: str | None = None, *, cfg=None, resume_from: str | os.PathLike | None = None
) -> list[Logger]:
    """The loggers `logger_cfg` (cfg.logger) asks for, writing into run_dir. With the full `cfg`
    the W&B run gets its identity (group, job type, tags); with `resume_from` (a checkpoint) every
    logger continues the run that checkpoint belongs to."""
    loggers: list[Logger] = []
    if not logger_cfg:
        return loggers
    run_dir = Path(run_dir)
    state = read_resume_state(resume_from) if resume_from else None
    if "csv" in logger_cfg:
        loggers.append(
            ResumableCSVLogger(
                save_dir=str(run_dir),
                name="csv",
                version="",
                flush_logs_every_n_steps=logger_cfg.csv.flush_logs_every_n_steps,
                keep_below_step=state.global_step if state else None,
            )
        )
    if "tensorboard" in logger_cfg:
        # No hp_metric (a scalar the other loggers do not have); purge_step hides the events a
        # killed run logged after the checkpoint this run resumes from.
        extra = {"purge_step": state.global_step} if state else {}
        loggers.append(
            TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False, **extra)
        )
    if "wandb" in logger_cfg:
        wb = _build_wandb(logger_cfg.wandb, run_dir, run_name, cfg, state)
        if wb is not None:
            loggers.append(wb)
    return loggers


def _build_wandb(w, run_dir: Path, name: str | None, cfg, state: ResumeState | None) -> LmforgeWandbLogger | None:
    mode = wandb_mode(w.mode)
    if mode == "disabled":
        if rank_zero_only.rank == 0:
            log.info("W&B disabled (mode=disabled): no W&B run")
        return None
    import wandb

    # wandb prints a banner and hints of its own; lmforge says what matters (the sync command).
    os.environ.setdefault("WANDB_SILENT", "true")
    hydra = hydra_runtime()
    prev = state.wandb if state else {}
    name = prev.get("name") or name or (run_name(cfg) if cfg is not None else None)
    group = prev.get("group") or (experiment_group(cfg, hydra) if cfg is not None else w.group)
    tags = run_tags(cfg, hydra) if cfg is not None else list(w.tags)
    job_type = w.job_type or (cfg.algo.name if cfg is not None else None)
    run_id = prev.get("id") or (new_run_id() if rank_zero_only.rank == 0 else None)
    settings = wandb.Settings(init_timeout=float(w.init_timeout), finish_timeout=float(w.finish_timeout), silent=True)
    logger = LmforgeWandbLogger(
        name=name,
        project=w.project,
        entity=w.entity,
        group=group,
        job_type=job_type,
        tags=tags,
        id=run_id,
        save_dir=str(run_dir),
        mode=mode,
        settings=settings,
        max_table_rows=w.max_table_rows,
        log_checkpoints=w.log_model,
        artifact_name=f"{job_type or 'model'}-{run_id}" if run_id else None,
        resume_step=int(prev.get("step", -1)) if prev else -1,
    )
    if rank_zero_only.rank == 0:
        if prev.get("id"):
            log.info("W&B: resuming run %s (%s) after step %s", prev["id"], name, prev.get("step"))
        if mode == "offline":
            log.info(
                "W&B offline%s: run %s in %s",
                "" if wandb_has_credentials() else " (no credentials)",
                run_id,
                run_dir / "wandb",
            )
    return logger


# ============================================================================ run config, end


def log_run_config(loggers: Iterable[Logger], cfg, trainer=None) -> dict[str, Any]:
    """The resolved config plus `meta` (run_metadata) as every logger's hyperparameters."""
    from omegaconf import OmegaConf

    if rank_zero_only.rank != 0:  # the loggers only write on rank zero
        return {}
    params = OmegaConf.to_container(cfg, resolve=True)
    params["meta"] = run_metadata(cfg, world_size=getattr(trainer, "world_size", None))
    for lg in loggers:
        lg.log_hyperparams(params)
    return params


def tracking_callbacks(cfg=None) -> list[Callback]:
    return [TrackingCallback()]


def write_run_summary(run_dir: str | os.PathLike, result: dict[str, Any]) -> Path | None:
    """run_dir/summary.json: the last result (final metrics, checkpoints, step) and every attempt's
    wall time (a resumed run appends one), for `python -m lmforge.report`."""
    if rank_zero_only.rank != 0:
        return None
    path = Path(run_dir) / "summary.json"
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text())
    attempts = list(old.get("attempts") or [])
    attempts.append(
        {
            "wall_s": result.get("wall_s"),
            "global_step": result.get("global_step"),
            "preempted": result.get("preempted", False),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    out = {**result, "attempts": attempts, "wall_s_total": round(sum(a.get("wall_s") or 0 for a in attempts), 1)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, path)
    return path


def finish_loggers(loggers: Iterable[Logger], status: str = "success", result: dict | None = None) -> None:
    """End of a run (call it in a `finally`): W&B's summary gets the wall time, offline runs print
    the `wandb sync` command, and the W&B run is finished, so the next job of a `-m` sweep starts
    its own run. status: success | failed | preempted."""
    if result is not None and result.get("run_dir"):
        write_run_summary(result["run_dir"], result)
    for lg in loggers:
        with contextlib.suppress(Exception):
            lg.save()
    if rank_zero_only.rank != 0:
        return
    for lg in wandb_loggers(loggers):
        run = lg._experiment
        if run is None:
            continue
        try:
            if result is not None:
                run.summary["wall_s"] = result.get("wall_s")
                run.summary["global_step"] = result.get("global_step")
            if status == "preempted":
                with contextlib.suppress(Exception):
                    run.mark_preempting()
            sync_dir = Path(run.settings.sync_dir) if lg.offline else None
            run.finish(exit_code=0 if status in ("success", "preempted") else 1)
            if sync_dir is not None:
                pattern = shlex.quote(str(sync_dir.parent)) + f"/offline-run-*-{run.id}"
                log.info("W&B offline run %s saved. Upload it with:\n  wandb sync %s", run.id, pattern)
        except Exception as e:  # noqa: BLE001 - never lose a finished training to a logging error
            log.warning("W&B: finishing run failed: %s: %s", type(e).__name__, e)
        lg._experiment = None


# ============================================================================ samples


def _short(v: Any, n: int = 120) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


@rank_zero_only
def log_text_samples(trainer, key: str, rows: list[dict[str, Any]]) -> None:
    """Samples go to <run_dir>/<key>.jsonl (all of them), to W&B as a bounded table `key`, to
    TensorBoard as text, and one line of the first to the console."""
    if not rows:
        return
    step = rows[0].get("step", trainer.global_step)
    first = rows[0]
    more = f" (+{len(rows) - 1} more in {key}.jsonl)" if len(rows) > 1 else ""
    response = next((first[k] for k in ("sample", "response") if k in first), None)
    if "prompt" in first and response is not None:
        shown = f"{_short(first['prompt'])} -> {_short(response)}"
    else:
        shown = " ".join(f"{k}={_short(v, 80)}" for k, v in list(first.items())[:4] if k != "step")
    log.info("%s @ step %s: %s%s", key, step, shown, more)
    run_dir = getattr(trainer, "lmforge_run_dir", None)
    if run_dir:
        with open(Path(run_dir) / f"{key}.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    for lg in trainer.loggers:
        if isinstance(lg, LmforgeWandbLogger):
            lg.log_samples(key, rows)
        elif isinstance(lg, WandbLogger):
            cols = list(rows[0].keys())
            lg.log_text(
                key=key,
                columns=cols,
                data=[[table_cell(r.get(c)) for c in cols] for r in rows],
                step=trainer.global_step,
            )
        elif isinstance(lg, TensorBoardLogger):
            with contextlib.suppress(Exception):
                lg.experiment.add_text(key, _markdown_table(rows), global_step=trainer.global_step)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
