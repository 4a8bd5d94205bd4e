"""SIGTERM within a gradient accumulation: the run finishes that optimizer step, saves it and
stops (a checkpoint of half an accumulation would lose the accumulated gradients); resuming it
gives the uninterrupted run's weights and optimizer state exactly. In-process: the signal goes
to this process from inside a training step, while Lightning's handler is installed."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from _reliability import one_thread, tiny_cfg  # noqa: F401 (one_thread: a fixture)

from lmforge.algos.pretrain import PretrainModule
from lmforge.run import main
from lmforge.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["trainer.max_steps=6", "trainer.eval_every=100", "trainer.accumulate_grad_batches=2", "model.dropout=0.1"]


def test_sigterm_mid_accumulation_stops_at_the_step_boundary_and_resumes_exactly(tmp_path, shared_cache, monkeypatch):
    ref = main(tiny_cfg(tmp_path / "ref", shared_cache, *COMMON))

    real = PretrainModule.training_step
    calls = {"n": 0}

    def training_step(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of optimizer step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(PretrainModule, "training_step", training_step)
    run = tmp_path / "run"
    stopped = main(tiny_cfg(run, shared_cache, *COMMON))
    assert stopped["preempted"] and stopped["global_step"] == 3
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").raw["global_step"] == 3
    monkeypatch.setattr(PretrainModule, "training_step", real)

    resumed = main(tiny_cfg(run, shared_cache, *COMMON, "resume=auto"))
    assert resumed["global_step"] == 6 and not resumed["preempted"]
    a, b = load_checkpoint(ref["last_checkpoint"]), load_checkpoint(resumed["last_checkpoint"])
    for k, v in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[k], v, rtol=0, atol=0, msg=k)
    for i, st in a.raw["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(b.raw["optimizer_states"][0]["state"][i]["exp_avg"], st["exp_avg"], rtol=0, atol=0)
