"""What is specific to Weights & Biases: the mode, the W&B logger, the checkpoint entry that names
a checkpoint's W&B run, checkpoints as W&B artifacts, and reading W&B run files.

This module knows nothing of the run config or Hydra; lmforge.training.tracking gives the W&B
logger its run identity (name, group, job type, tags) and builds it next to the other loggers.

Modes: `logger.wandb.mode=auto` is online when credentials exist (WANDB_API_KEY, an identity
token file, or a netrc entry for the W&B host), offline otherwise; `WANDB_MODE` in the environment
wins (`WANDB_MODE=disabled`: no W&B logger at all). Never prompts for a login; an online run
whose init fails or times out (`logger.wandb.init_timeout`) falls back to offline. Offline runs
print the `wandb sync` command at the end. Only rank zero creates a run.

Steps: W&B's step is the trainer's step (`_step == trainer/global_step`); LmforgeWandbLogger never
logs a step at or before the checkpoint a run resumed from, nor a step backwards. Every checkpoint
records its W&B run (`CHECKPOINT_KEY`, written by TrackingCallback, read by read_resume_state).

Run files: read_wandb_run parses a `run-<id>.wandb` file without a network or a W&B service.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

# The checkpoint entry naming the W&B run a checkpoint belongs to (TrackingCallback writes it).
CHECKPOINT_KEY = "lmforge_tracking"


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


# ============================================================================ W&B logger


class LmforgeWandbLogger(WandbLogger):
    """Lightning's WandbLogger with W&B's step pinned to the trainer's step (so a resumed run
    continues its axis and never logs a step twice or backwards), bounded sample tables, an
    offline fallback when an online init fails, and checkpoints logged with their lineage."""

    def __init__(
        self,
        *,
        max_table_rows: int = 100,
        resume_step: int = -1,
        log_checkpoints: bool = False,
        artifact_name: str | None = None,
        **kwargs: Any,
    ):
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
                log.warning(
                    "W&B: online init failed (%s: %s); logging offline instead",
                    type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "",
                )
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
        return {
            "id": self.version,
            "name": self._wandb_init.get("name"),
            "group": self._wandb_init.get("group"),
            "project": self._wandb_init.get("project"),
            "step": self._last_step,
            "artifact": self.artifact_name,
        }

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
        table = wandb.Table(columns=list(cols), data=[[table_cell(r.get(c)) for c in cols] for r in kept])
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
        log.info(
            "W&B: logged %s as artifact %s (lineage: %s)",
            ", ".join(f.name for f in files),
            self.artifact_name,
            ", ".join(f"{k}={v}" for k, v in lineage.items()) or "none",
        )


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:128]


def table_cell(v: Any) -> Any:
    """A W&B table cell: None and scalars as they are, anything else as its str()."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def new_run_id(length: int = 8) -> str:
    """A W&B run id (lowercase letters and digits), chosen here so it is known before W&B starts."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_loggers(loggers: Iterable[Logger]) -> list[LmforgeWandbLogger]:
    return [lg for lg in loggers if isinstance(lg, LmforgeWandbLogger)]


# ============================================================================ checkpoints


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
            out.run = {
                "id": r.run_id,
                "name": r.display_name,
                "group": r.run_group,
                "job_type": r.job_type,
                "tags": list(r.tags),
                "project": r.project,
                "resumed": r.resumed,
                "starting_step": r.starting_step,
            }
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
            out.artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": value(a.metadata) if a.metadata else {},
                    "files": [e.path for e in a.manifest.contents],
                }
            )
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
