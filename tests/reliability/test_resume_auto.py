"""resume=auto resumes from the newest VALID checkpoint of the run folder and says which (a
corrupt or truncated newer one is skipped with a message), keeps the LR schedule's horizon, and
periodic checkpoints (by steps and by wall time, keep-last-k) are written atomically."""

from __future__ import annotations

import shutil

import pytest
from _reliability import (  # noqa: F401
    LightningLog,
    losses,
    metrics_path,
    one_thread,
    read_rows,
    tiny_cfg,
    trained_run,
)

from lmforge.run import main
from lmforge.training import checkpoint_io
from lmforge.training.checkpoint import load_checkpoint
from lmforge.training.checkpoint_io import newest_valid_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wall_time_checkpoints_keep_the_last_k_and_go_through_the_atomic_writer(tmp_path, shared_cache, monkeypatch):
    written = []
    real = checkpoint_io.atomic_torch_save

    def spy(obj, path, write=None):
        written.append((path.name, obj["global_step"]))
        return real(obj, path, write)

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", spy)
    run = tmp_path / "run"
    # No validation within the run (eval_every > max_steps): every save here is the wall-time one,
    # due after each step with so short an interval.
    main(
        tiny_cfg(
            run,
            shared_cache,
            "trainer.max_steps=5",
            "trainer.eval_every=100",
            "trainer.checkpoint_every_minutes=1e-6",
            "trainer.keep_last=3",
        )
    )
    assert written == [("last.ckpt", s) for s in range(1, 6)]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "step-0000003.ckpt",
        "step-0000004.ckpt",
        "step-0000005.ckpt",
    ]
    # A kept copy is a hard link to the last.ckpt of its time: no second write, no extra space.
    assert (ckpts / "step-0000005.ckpt").stat().st_ino == (ckpts / "last.ckpt").stat().st_ino
    assert load_checkpoint(ckpts / "step-0000004.ckpt").raw["global_step"] == 4


def test_resume_auto_skips_a_corrupt_newest_checkpoint_and_keeps_the_lr_horizon(
    tmp_path_factory, tmp_path, shared_cache
):
    source = trained_run(tmp_path_factory, shared_cache)  # 6 steps, last.ckpt at step 6
    run = tmp_path / "run"
    shutil.copytree(source, run)
    ckpts = run / "checkpoints"
    # The newest files claim more progress but are damaged: a save cut short, and junk.
    last = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "step-0000009.ckpt").write_bytes(last[: len(last) // 3])
    (run / "hpc_ckpt_2.ckpt").write_bytes(b"\x00garbage" * 100)

    said = []
    info = newest_valid_checkpoint(run, say=said.append)
    assert info is not None and info.global_step == 6 and info.path.name == "last.ckpt"
    assert any("step-0000009.ckpt" in m and "cannot be read" in m for m in said), said
    assert any("hpc_ckpt_2.ckpt" in m for m in said), said

    # Continue to step 8. The first run decayed its LR over trainer.max_steps=6 (no decay_steps):
    # the resumed run keeps that schedule instead of stretching it to 8.
    with LightningLog() as captured:
        result = main(tiny_cfg(run, shared_cache, "trainer.max_steps=8", "trainer.eval_every=2", "resume=auto"))
    log = captured.text
    assert f"resume=auto: resuming from {ckpts / 'last.ckpt'} (step 6)" in log, log[-3000:]
    assert "step-0000009.ckpt" in log and "skipping" in log
    assert "algo.optim.decay_steps=6" in log
    assert result["global_step"] == 8 and not result["preempted"]
    logged = losses(read_rows(metrics_path(run)), "train/lr")
    lr = dict(logged)
    base = tiny_cfg(run, shared_cache).algo.optim
    # The CSV keeps the first attempt's rows (steps 0-5) and the resumed part adds 6 and 7 (0-based),
    # each step once.
    assert sorted(s for s, _ in logged) == list(range(8))
    for step in (6, 7):  # past the 6-step horizon: the cosine's floor
        assert lr[step] == pytest.approx(base.lr * base.min_lr_ratio, rel=1e-6), lr
    assert load_checkpoint(ckpts / "last.ckpt").raw["global_step"] == 8


def test_resume_auto_in_an_empty_folder_starts_fresh(tmp_path):
    from lmforge.run import find_resume_checkpoint

    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache", "resume=auto")
    with LightningLog() as captured:
        assert find_resume_checkpoint(cfg, tmp_path / "run") is None
    assert "no valid checkpoint" in captured.text
