"""Experiment tracking: the loggers (conf/logger/*.yaml), a run's identity and metadata, resuming
the same W&B run, checkpoints as W&B artifacts with their lineage, and bounded sample tables.

Identity (W&B): name `<stage>-<model>-<data>-<time>` (e.g. `ppo-tiny-synthetic-20250101-120000`),
group = the experiment (`experiment_name=...`, else the Hydra sweep for `-m` jobs, else
`<model>-<data>`), job_type = the stage, tags = the config choices (`model:tiny`, `algo:ppo`, ...).
The run config is the resolved config plus `meta` (`run_metadata()`: command line, git commit and
dirty flag, package versions, world size, Hydra choices and overrides).

Resume: every checkpoint records the W&B run (`CHECKPOINT_KEY`: id, name, group, last logged
step); `build_loggers(..., resume_from=ckpt)` reads it before any logger exists and continues that
run (same id, `resume="allow"`). W&B's step is the trainer's step (`_step == trainer/global_step`),
so a resumed run continues the axis: steps at or before the checkpoint are not logged twice, and a
step is never logged backwards. The CSV logger keeps the rows before the checkpoint (Lightning's
would delete metrics.csv) and TensorBoard purges the events after it.

Modes: `logger.wandb.mode=auto` is online when credentials exist (WANDB_API_KEY, an identity
token file, or a netrc entry for the W&B host), offline otherwise; `WANDB_MODE` in the environment
wins (`WANDB_MODE=disabled`: no W&B logger at all). Never prompts for a login; an online run
whose init fails or times out (`logger.wandb.init_timeout`) falls back to offline. Offline runs
print the `wandb sync` command at the end. Only rank zero creates a run.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import netrc
import os
import platform
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

# The checkpoint entry naming the W&B run a checkpoint belongs to (lmforge.training.tracking writes it).
CHECKPOINT_KEY = "lmforge_tracking"
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
    return {k: v for k, v in (hydra.get("choices") or {}).items()
            if v is not None and not any(k == g or k.startswith(g + "/") for g in _NOT_IDENTITY)}


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
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

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


# ============================================================================ W&B mode


def _wandb_host() -> str:
    from urllib.parse import urlparse

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return urlparse(url).hostname or "api.wandb.ai"


def wandb_has_credentials() -> bool:
    """An API key in the environment, an identity token file, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(_wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str) -> str:
    """online | offline | disabled: the environment's WANDB_MODE wins; auto (and online without
    credentials, which would prompt for a login) becomes offline."""
    env = os.environ.get("WANDB_MODE")
    mode = env or requested
    if mode in ("dryrun",):
        mode = "offline"
    if mode not in ("auto", "online", "offline", "disabled"):
        where = f"WANDB_MODE={env}" if env else f"logger.wandb.mode={requested}"
        raise ValueError(f"{where}: use auto, online, offline or disabled")
    if mode == "auto" or (mode == "online" and not wandb_has_credentials()):
        if mode == "online":
            log.warning("W&B: mode online but no credentials (WANDB_API_KEY or `wandb login`): logging offline")
        return "online" if mode == "auto" and wandb_has_credentials() else "offline"
    return mode


# ============================================================================ resume state


@dataclass
class ResumeState:
    """What a checkpoint says about the logging of the run that wrote it."""

    global_step: int = 0
    wandb: dict[str, Any] = field(default_factory=dict)  # id, name, group, project, step


def read_resume_state(path: str | os.PathLike | None) -> ResumeState | None:
    """The tracking entry and step of a checkpoint, read memory-mapped (no weights are loaded)."""
    if not path:
        return None
    import torch

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - the caller validates the checkpoint itself
        log.debug("no tracking state in %s: %s", path, e)
        return None
    if not isinstance(raw, dict):
        return None
    return ResumeState(int(raw.get("global_step") or 0), dict(raw.get(CHECKPOINT_KEY) or {}))


def wandb_id_from_checkpoint(path: str | os.PathLike | None) -> str | None:
    """The W&B run id a checkpoint was logged to (None: none recorded)."""
    state = read_resume_state(path)
    return (state.wandb.get("id") or None) if state else None


# ============================================================================ loggers


class LmforgeWandbLogger(WandbLogger):
    """Lightning's WandbLogger with W&B's step pinned to the trainer's step (so a resumed run
    continues its axis and never logs a step twice or backwards), bounded sample tables, an
    offline fallback when an online init fails, and checkpoints logged with their lineage."""

    def __init__(self, *, max_table_rows: int = 100, resume_step: int = -1, log_checkpoints: bool = False,
                 artifact_name: str | None = None, **kwargs: Any):
        super().__init__(log_model=False, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None, which wandb >= 0.19 answers with a deprecation warning.
            self._wandb_init.pop("anonymous", None)
        self.max_table_rows = max_table_rows
        self.log_checkpoints = log_checkpoints
        self._resume_floor = resume_step  # steps <= this are already in the resumed W&B run
        self._last_step = resume_step
        self._tables: dict[str, tuple[list[str], deque]] = {}
        # The model artifact's name, fixed up front so every checkpoint can name it (lineage).
        self.artifact_name = _artifact_name(artifact_name) if log_checkpoints and artifact_name else None

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            try:
                exp = WandbLogger.experiment.fget(self)
            except Exception as e:  # noqa: BLE001 - network, auth or timeout: keep training, log offline
                if self._wandb_init.get("mode") in ("offline", "disabled"):
                    raise
                log.warning("W&B: online init failed (%s: %s); logging offline instead",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self._wandb_init["mode"] = "offline"
                self._experiment = None
                import wandb

                wandb.teardown()  # the failed init still holds the run id in W&B's service
                exp = WandbLogger.experiment.fget(self)
            starting = getattr(exp, "starting_step", 0) or 0
            if getattr(exp, "resumed", False) and starting > 0:
                # Online resume: W&B already has steps below starting_step; never log below it.
                self._resume_floor = max(self._resume_floor, starting - 1)
                self._last_step = max(self._last_step, starting - 1)
        return self._experiment

    @property
    def offline(self) -> bool:
        return self._wandb_init.get("mode") == "offline"

    def tracking_state(self) -> dict[str, Any]:
        """The checkpoint entry a resumed run reads back (see read_resume_state)."""
        return {"id": self.version, "name": self._wandb_init.get("name"), "group": self._wandb_init.get("group"),
                "project": self._wandb_init.get("project"), "step": self._last_step,
                "artifact": self.artifact_name}

    @rank_zero_only
    def log_metrics(self, metrics, step: Optional[int] = None) -> None:
        metrics = dict(metrics)
        if step is None:
            step = max(self._last_step, 0)
        step = int(step)
        if step <= self._resume_floor:
            log.debug("W&B: not logging step %d again (the resumed run has it): %s", step, sorted(metrics))
            return
        if step < self._last_step:
            # Out of order (a stage logging for an earlier step): on the current row, not dropped by W&B.
            self.experiment.log(metrics, step=self._last_step)
            return
        self._last_step = step
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step)

    @rank_zero_only
    def log_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Append rows to the table `key` (the newest max_table_rows kept) and log it as a
        wandb.Table on the current step (a table never moves the step axis)."""
        import wandb

        cols, kept = self._tables.get(key, ([], deque(maxlen=max(1, self.max_table_rows))))
        for r in rows:
            cols += [c for c in r if c not in cols]
            kept.append(dict(r))
        self._tables[key] = (cols, kept)
        table = wandb.Table(columns=list(cols), data=[[_cell(r.get(c)) for c in cols] for r in kept])
        # The current row; right after a resume, the first new one (the resumed run has the floor's).
        self._last_step = max(self._last_step, self._resume_floor + 1)
        self.experiment.log({key: table}, step=self._last_step)

    @rank_zero_only
    def log_checkpoint_artifact(self, trainer, pl_module) -> None:
        """The run's final checkpoints (last.ckpt, best.ckpt) as one `model` artifact version whose
        metadata records the stage, the step and the lineage (init_from, reference, reward model,
        critic) with the W&B runs and artifacts those checkpoints came from."""
        import wandb

        cb = trainer.checkpoint_callback
        ckpt_dir = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        files = [ckpt_dir / n for n in ("last.ckpt", "best.ckpt") if (ckpt_dir / n).is_file()]
        if not files:
            log.warning("W&B: log_model is on but %s holds no last.ckpt/best.ckpt", ckpt_dir)
            return
        stage = getattr(pl_module, "stage", "model")
        lineage = {k: str(v) for k, v in (getattr(pl_module, "lineage", None) or {}).items()}
        sources = {}
        for k, p in lineage.items():
            st = read_resume_state(p) if Path(p).is_file() else None
            if st and st.wandb:
                sources[k] = {kk: st.wandb.get(kk) for kk in ("id", "name", "project", "artifact")}
        best = getattr(cb, "best_model_score", None)
        metadata = {
            "stage": stage,
            "global_step": int(trainer.global_step),
            "run_dir": str(getattr(trainer, "lmforge_run_dir", trainer.default_root_dir)),
            "files": [f.name for f in files],
            "lineage": lineage,
            "lineage_runs": sources,
            "monitor": getattr(cb, "monitor", None),
            "best_score": float(best) if best is not None else None,
        }
        self.artifact_name = self.artifact_name or _artifact_name(f"{stage}-{self.version}")
        artifact = wandb.Artifact(name=self.artifact_name, type="model", metadata=metadata)
        for f in files:
            artifact.add_file(str(f), name=f.name)
        self.experiment.log_artifact(artifact, aliases=["latest", f"step-{trainer.global_step}"])
        log.info("W&B: logged %s as artifact %s (lineage: %s)", ", ".join(f.name for f in files),
                 self.artifact_name, ", ".join(f"{k}={v}" for k, v in lineage.items()) or "none")


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:128]


def _cell(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


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


def build_loggers(logger_cfg, run_dir: Path, run_name: str | None = None, *, cfg=None,
                  resume_from: str | os.PathLike | None = None) -> list[Logger]:
    """The loggers `logger_cfg` (cfg.logger) asks for, writing into run_dir. With the full `cfg`
    the W&B run gets its identity (group, job type, tags); with `resume_from` (a checkpoint) every
    logger continues the run that checkpoint belongs to."""
    loggers: list[Logger] = []
    if not logger_cfg:
        return loggers
    run_dir = Path(run_dir)
    state = read_resume_state(resume_from) if resume_from else None
    if "csv" in logger_cfg:
        loggers.append(ResumableCSVLogger(
            save_dir=str(run_dir), name="csv", version="",
            flush_logs_every_n_steps=logger_cfg.csv.flush_logs_every_n_steps,
            keep_below_step=state.global_step if state else None))
    if "tensorboard" in logger_cfg:
        # No hp_metric (a scalar the other loggers do not have); purge_step hides the events a
        # killed run logged after the checkpoint this run resumes from.
        extra = {"purge_step": state.global_step} if state else {}
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                         default_hp_metric=False, **extra))
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
    settings = wandb.Settings(init_timeout=float(w.init_timeout), finish_timeout=float(w.finish_timeout),
                              silent=True)
    logger = LmforgeWandbLogger(
        name=name, project=w.project, entity=w.entity, group=group, job_type=job_type, tags=tags,
        id=run_id, save_dir=str(run_dir), mode=mode, settings=settings,
        max_table_rows=w.max_table_rows, log_checkpoints=w.log_model,
        artifact_name=f"{job_type or 'model'}-{run_id}" if run_id else None,
        resume_step=int(prev.get("step", -1)) if prev else -1,
    )
    if rank_zero_only.rank == 0:
        if prev.get("id"):
            log.info("W&B: resuming run %s (%s) after step %s", prev["id"], name, prev.get("step"))
        if mode == "offline":
            log.info("W&B offline%s: run %s in %s", "" if wandb_has_credentials() else " (no credentials)",
                     run_id, run_dir / "wandb")
    return logger


def new_run_id(length: int = 8) -> str:
    """A W&B run id (lowercase letters and digits), chosen here so it is known before W&B starts."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_loggers(loggers: Iterable[Logger]) -> list[LmforgeWandbLogger]:
    return [lg for lg in loggers if isinstance(lg, LmforgeWandbLogger)]


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


class TrackingCallback(Callback):
    """Writes the W&B run into every checkpoint (CHECKPOINT_KEY) and, when logger.wandb.log_model
    is on, logs the final checkpoints as an artifact at the end of a successful fit."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for lg in wandb_loggers(trainer.loggers):
            checkpoint[CHECKPOINT_KEY] = lg.tracking_state()

    def on_fit_end(self, trainer, pl_module) -> None:
        for lg in wandb_loggers(trainer.loggers):
            if lg.log_checkpoints:
                lg.log_checkpoint_artifact(trainer, pl_module)


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
    attempts.append({"wall_s": result.get("wall_s"), "global_step": result.get("global_step"),
                     "preempted": result.get("preempted", False), "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
            lg.log_text(key=key, columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows],
                        step=trainer.global_step)
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


# ============================================================================ reading W&B run files


@dataclass
class WandbRunFile:
    """The records of one `run-<id>.wandb` file (an offline run, or the local copy of an online one)."""

    path: Path
    run: dict[str, Any] = field(default_factory=dict)  # id, name, group, job_type, tags, project, resumed
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per step, with "_step"
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # name, type, metadata, aliases
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def steps(self) -> list[int]:
        return [int(h["_step"]) for h in self.history]


def _leveldb_records(data: bytes) -> Iterable[bytes]:
    """The records of W&B's transaction log: a 7-byte header (':W&B', magic, version), then
    LevelDB-log framing (32 KiB blocks of [crc32 u32, length u16, type u8] + payload chunks)."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    block, off, buf = 32768, 7, b""
    while off + 7 <= len(data):
        left = block - off % block
        if left < 7:
            off += left
            continue
        _, length, kind = struct.unpack("<IHB", data[off : off + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block or file
            off += left
            continue
        chunk = data[off + 7 : off + 7 + length]
        off += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end one
            yield buf
            buf = b""


def read_wandb_run(path: str | os.PathLike) -> WandbRunFile:
    """Parse a `run-<id>.wandb` file (or the run folder holding one) without a network or a W&B
    service: the run's identity, config updates, history rows, artifacts and summary."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path}: no run-*.wandb file")
        path = found[0]
    out = WandbRunFile(path)

    def item_key(i) -> str:
        return i.key or "/".join(i.nested_key)

    def value(s: str) -> Any:
        try:
            return json.loads(s)
        except ValueError:
            return s

    def update(target: dict, items) -> None:
        for u in items:
            k = item_key(u)
            if k != "_wandb":
                target[k] = value(u.value_json)

    for blob in _leveldb_records(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.run = {"id": r.run_id, "name": r.display_name, "group": r.run_group, "job_type": r.job_type,
                       "tags": list(r.tags), "project": r.project, "resumed": r.resumed,
                       "starting_step": r.starting_step}
            update(out.config, r.config.update)
        elif kind == "config":
            update(out.config, rec.config.update)
            for rm in rec.config.remove:
                out.config.pop(item_key(rm), None)
        elif kind == "history":
            row = {item_key(i): value(i.value_json) for i in rec.history.item}
            row["_step"] = rec.history.step.num if rec.history.HasField("step") else row.get("_step")
            out.history.append(row)
        elif kind == "summary":
            update(out.summary, rec.summary.update)
        elif kind == "artifact":
            a = rec.artifact
            out.artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                  "metadata": value(a.metadata) if a.metadata else {},
                                  "files": [e.path for e in a.manifest.contents]})
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
    return out


def wandb_run_files(run_dir: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """The run-*.wandb files under run_dir/wandb (offline and online run folders), oldest first."""
    root = Path(run_dir) / "wandb"
    pattern = f"*run-*-{run_id}/run-{run_id}.wandb" if run_id else "*run-*/run-*.wandb"
    def started(p: Path) -> str:  # offline-run-YYYYmmdd_HHMMSS-<id> / run-YYYYmmdd_HHMMSS-<id>
        m = re.search(r"(\d{8}_\d{6})", p.parent.name)
        return m.group(1) if m else p.parent.name

    return sorted(root.glob(pattern), key=started)
