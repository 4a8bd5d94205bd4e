"""Checkpoint files on disk: written atomically, and the newest valid one found again for resume=auto.

- `atomic_torch_save`, `AtomicCheckpointIO`: every checkpoint is written to a temporary file in
  the same folder, fsync'ed, then renamed over the target; a kill mid-write leaves the previous
  file intact. Loading is always `torch.load(weights_only=True)`: a pickle with code in it is refused.
- `probe_checkpoint`, `checkpoint_candidates`, `newest_valid_checkpoint`: what `resume=auto`
  resumes from (damaged, truncated or weights-only checkpoints are skipped).
- `remove_stale_temporaries`: the temporary files a killed write left behind.

Kept apart from `fault` (what keeps a run going) so that reading and writing checkpoint files
is in one place; loading itself (`safe_torch_load`, `CheckpointError`) is in `checkpoint`.
"""

from __future__ import annotations

import errno
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lmforge.training.checkpoint import CheckpointError, safe_torch_load

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one at that path is intact."""


# ============================================================================ atomic writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_torch_save(obj: Any, path: str | os.PathLike, write: Callable[[Any, Any], None] | None = None) -> None:
    """torch.save(obj) to `path` so that `path` is always either the old file or the whole new one.

    Writes `.<name>.tmp-<pid>` in the same folder (so the rename cannot cross filesystems),
    flushes and fsyncs it, renames it over `path` (atomic on POSIX) and fsyncs the folder (so
    the rename survives a power loss). On any failure the temporary file is removed; an OSError
    (disk full, quota, permissions) becomes a CheckpointSaveError saying the old file is intact.
    """
    path = Path(path)
    tmp = tmp_name(path)
    write = write or torch.save
    try:
        with open(tmp, "wb") as f:
            write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) or isinstance(getattr(e, "__cause__", None), OSError):
            os_err = e if isinstance(e, OSError) else e.__cause__
            hint = (
                "the disk is full: free space or move the run folder (hydra.run.dir=...)"
                if getattr(os_err, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
                else "check that the folder is writable"
            )
            kept = "the previous checkpoint there is intact" if path.exists() else "no checkpoint was written"
            raise CheckpointSaveError(f"could not write checkpoint {path} ({os_err}): {hint}; {kept}") from e
        if isinstance(e, RuntimeError) and "file write failed" in str(e).lower():
            kept = "the previous checkpoint there is intact" if path.exists() else "no checkpoint was written"
            raise CheckpointSaveError(f"could not write checkpoint {path} ({e}): the disk may be full; {kept}") from e
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic, fsync'ed writes and weights_only reads.

    Every checkpoint Lightning writes (ModelCheckpoint, PeriodicCheckpoint, trainer.save_checkpoint,
    SLURM's hpc_ckpt) and the checkpoint `trainer.fit(ckpt_path=...)` resumes from go through here.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            rank_zero_warn("lmforge loads checkpoints with weights_only=True only; ignoring weights_only=False")
        return safe_torch_load(path, map_location=map_location if map_location is not None else "cpu")


# ============================================================================ resume


@dataclass
class CheckpointInfo:
    path: Path
    global_step: int
    mtime: float
    stage: str | None


# Checksums of bigger checkpoints are not re-read at resume (the zip structure still is): every
# rank would read the whole file once more. Atomic writes leave no partial files to catch anyway.
VERIFY_CRC_BELOW = 8 << 30


def probe_checkpoint(path: str | os.PathLike, verify_data: bool = False) -> CheckpointInfo:
    """Cheaply check that `path` is a complete, resumable lmforge checkpoint (mmap'ed, tensors
    not read); with verify_data, also check every stored CRC (reads the whole file; only for
    files under VERIFY_CRC_BELOW). Raises CheckpointError saying what is wrong."""
    path = Path(path)
    raw = safe_torch_load(path, mmap=True)
    if not isinstance(raw, dict) or "lmforge" not in raw:
        raise CheckpointError(f"{path}: not a lmforge checkpoint (no 'lmforge' metadata entry)")
    missing = [k for k in ("state_dict", "global_step", "loops", "optimizer_states") if k not in raw]
    if missing:
        raise CheckpointError(
            f"{path}: cannot resume training from it (no {', '.join(missing)}: a weights-only "
            "checkpoint); use it as init_from instead"
        )
    if verify_data and path.stat().st_size < VERIFY_CRC_BELOW:
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: damaged ({e})") from None
        if bad is not None:
            raise CheckpointError(f"{path}: damaged (checksum mismatch in {bad})")
    return CheckpointInfo(path, int(raw["global_step"]), path.stat().st_mtime, raw["lmforge"].get("stage"))


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint a run folder may hold: checkpoints/*.ckpt and SLURM's hpc_ckpt_*.ckpt."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    found += list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(p for p in found if p.is_file())


def newest_valid_checkpoint(
    run_dir: str | os.PathLike, say: Callable[[str], None] | None = None
) -> CheckpointInfo | None:
    """The valid checkpoint of the run folder with the highest step (the newest file on a tie).

    Damaged or truncated ones are skipped, each with a message; the chosen one's stored
    checksums are verified too (falling back to the next best if they do not match).
    """
    say = say or log.info
    infos: list[CheckpointInfo] = []
    for path in checkpoint_candidates(run_dir):
        try:
            infos.append(probe_checkpoint(path))
        except CheckpointError as e:
            say(f"resume=auto: skipping {path}: {e}")
    for info in sorted(infos, key=lambda i: (i.global_step, i.mtime), reverse=True):
        try:
            probe_checkpoint(info.path, verify_data=True)
        except CheckpointError as e:
            say(f"resume=auto: skipping {info.path}: {e}")
            continue
        return info
    return None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of checkpoint writes that a killed process left behind."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.ckpt.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


__all__ = [
    "AtomicCheckpointIO",
    "CheckpointInfo",
    "CheckpointSaveError",
    "atomic_torch_save",
    "checkpoint_candidates",
    "newest_valid_checkpoint",
    "probe_checkpoint",
    "remove_stale_temporaries",
    "tmp_name",
]
