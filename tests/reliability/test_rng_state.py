"""The RNG states travel in the checkpoint (loadable with weights_only=True) and come back right
before the first resumed training batch: torch, Python and NumPy draw what they would have."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from lmforge.training.fault import RNGState


def draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand()), torch.randn(2).tolist()


def test_rng_states_round_trip_through_a_weights_only_checkpoint():
    cb = RNGState()
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    draws()  # somewhere mid-run
    state = cb.state_dict()
    buf = io.BytesIO()
    torch.save({"callbacks": {"RNGState": state}}, buf)
    expected = draws()

    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["callbacks"]["RNGState"]
    resumed = RNGState()
    resumed.load_state_dict(loaded)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a fresh process seeds itself...
    torch.rand(5)  # ... and builds its DataLoader iterators, which draw a seed
    resumed.on_train_batch_start(None, None, None, 0)  # restored here, not at load time
    assert draws() == expected
    resumed.on_train_batch_start(None, None, None, 1)  # only once
    assert draws() != expected
