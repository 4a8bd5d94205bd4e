"""A non-finite loss skips the optimizer step (counted in train/skipped_steps); max_bad_steps in a
row stop the run with a clear message and the last good checkpoint kept. Plus the helpers a
manual-optimization stage (PPO) calls: grads_are_finite and collapse_warning."""

from __future__ import annotations

import math

import pytest
import torch
from _reliability import one_thread, tiny_cfg  # noqa: F401 (one_thread: a fixture)

from lmforge.algos.pretrain import PretrainModule
from lmforge.run import main
from lmforge.training.checkpoint import load_checkpoint
from lmforge.training.fault import NonFiniteError, collapse_warning, grads_are_finite

pytestmark = pytest.mark.usefixtures("one_thread")


def inject_nan_loss(monkeypatch, steps: set[int]) -> None:
    """The training loss of these (1-based) optimizer steps becomes NaN, so are its gradients."""
    real = PretrainModule.lm_loss

    def lm_loss(self, batch):
        loss = real(self, batch)
        if self.training and self.global_step + 1 in steps:
            return loss * float("nan")
        return loss

    monkeypatch.setattr(PretrainModule, "lm_loss", lm_loss)


def test_a_nan_step_is_skipped_and_counted(tmp_path, shared_cache, monkeypatch):
    inject_nan_loss(monkeypatch, {3})
    result = main(tiny_cfg(tmp_path / "run", shared_cache, "trainer.max_steps=6", "trainer.eval_every=3"))
    assert result["metrics"]["train/skipped_steps"] == 1
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt.raw["global_step"] == 6
    # Weights stayed finite, and AdamW took 5 real steps: the bad one never reached the optimizer.
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())
    steps = {float(s["step"]) for s in ckpt.raw["optimizer_states"][0]["state"].values()}
    assert steps == {5.0}
    assert ckpt.raw["callbacks"]["NonFiniteGuard"] == {"skipped": 1, "in_a_row": 0}


def test_bad_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, shared_cache, monkeypatch):
    inject_nan_loss(monkeypatch, set(range(5, 100)))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        main(tiny_cfg(run, shared_cache, "trainer.max_steps=12", "trainer.eval_every=4", "trainer.max_bad_steps=3"))
    msg = str(e.value)
    assert "3 optimizer steps in a row" in msg and "trainer.max_bad_steps=3" in msg, msg
    last = run / "checkpoints" / "last.ckpt"
    assert str(last) in msg and "stopping at step 7" in msg, msg
    ckpt = load_checkpoint(last)
    assert ckpt.raw["global_step"] == 4  # written before the bad steps, not overwritten on the way out
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())


def test_grads_are_finite():
    model = torch.nn.Linear(3, 2)
    assert grads_are_finite(model)  # no gradients yet
    model(torch.ones(1, 3)).sum().backward()
    assert grads_are_finite(model) and grads_are_finite(model.parameters())
    model.bias.grad[0] = float("inf")
    assert not grads_are_finite(model)
    model.bias.grad[0] = float("nan")
    assert not grads_are_finite(list(model.parameters()))


def test_collapse_warning():
    assert collapse_warning(entropy=1.5, kl=2.0) is None
    with pytest.warns(UserWarning, match="entropy 0.001"):
        msg = collapse_warning(entropy=0.001, kl=2.0, step=40)
    assert msg.startswith("step 40:") and "collapsing" in msg
    with pytest.warns(UserWarning, match="KL to the reference 150"):
        assert "drifting" in collapse_warning(entropy=1.0, kl=150.0)
    with pytest.warns(UserWarning):
        assert collapse_warning(entropy=math.nan, kl=1.0) is not None
