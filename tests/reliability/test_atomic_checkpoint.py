"""Checkpoint writes are atomic: a process killed, or a disk filling up, in the middle of a save
never leaves a truncated checkpoint under the real name; the previous one survives and loads."""

from __future__ import annotations

import errno
import io
import os
import signal

import pytest
import torch

from lmforge.training.checkpoint import CheckpointError, safe_torch_load
from lmforge.training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointSaveError,
    atomic_torch_save,
    checkpoint_candidates,
    newest_valid_checkpoint,
    remove_stale_temporaries,
)

OLD = {"weights": torch.arange(10.0), "step": 1}
NEW = {"weights": torch.randn(200_000), "step": 2}  # ~800 KB: a write that takes many syscalls


def half_then(action):
    """A writer that serializes the checkpoint, writes the first half of its bytes, then `action()`."""

    def write(obj, f):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        action()

    return write


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    atomic_torch_save(OLD, path)
    pid = os.fork()
    if pid == 0:  # the child: dies by SIGKILL halfway through writing the new checkpoint
        try:
            atomic_torch_save(NEW, path, write=half_then(lambda: os.kill(os.getpid(), signal.SIGKILL)))
        finally:
            os._exit(3)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # The real name still holds the old, complete checkpoint.
    assert torch.equal(safe_torch_load(path)["weights"], OLD["weights"])
    # The half-written temporary is there, but never taken for a checkpoint ...
    leftovers = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.tmp-")
    assert checkpoint_candidates(tmp_path) == [path]
    # ... and the next resume=auto clears it away.
    assert remove_stale_temporaries(path.parent) == leftovers
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_disk_full_in_the_middle_of_a_save_is_a_clear_error_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save(OLD, path)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointSaveError) as e:
        atomic_torch_save(NEW, path, write=half_then(disk_full))
    msg = str(e.value)
    assert str(path) in msg and "disk is full" in msg and "previous checkpoint there is intact" in msg
    assert torch.equal(safe_torch_load(path)["weights"], OLD["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "the temporary file must be removed"


def test_any_exception_mid_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save(OLD, path)

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(NEW, path, write=half_then(crash))
    assert torch.equal(safe_torch_load(path)["weights"], OLD["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path):
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    atomic_torch_save(NEW, good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="bad.ckpt: cannot be read"):
        safe_torch_load(bad)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        AtomicCheckpointIO().load_checkpoint(bad)


def test_checkpoint_io_writes_atomically(tmp_path):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "x.ckpt"
    io_.save_checkpoint(NEW, path)  # creates the folder
    assert torch.equal(io_.load_checkpoint(path)["weights"], NEW["weights"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.ckpt"]
    said = []
    assert newest_valid_checkpoint(tmp_path, say=said.append) is None  # complete, but not resumable
    assert "x.ckpt" in said[0] and "not a lmforge checkpoint" in said[0]
