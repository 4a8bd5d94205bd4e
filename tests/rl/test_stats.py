import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.rl.stats import explained_variance, masked_mean, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 8.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
# Real elements: 1, 2, 3, 4, 5 -> mean 3, squared deviations 4+1+0+1+4 = 10.


def test_masked_mean_hand_values():
    assert masked_mean(X, MASK).item() == pytest.approx(3.0)
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 4.5]))
    torch.testing.assert_close(masked_mean(X, MASK.bool(), dim=0), torch.tensor([2.5, 3.5, 3.0, 0.0]))


def test_masked_mean_ignores_nonfinite_padding():
    x = X.clone()
    x[0, 3] = float("inf")
    x[1, 3] = float("nan")
    assert masked_mean(x, MASK).item() == pytest.approx(3.0)
    assert masked_var(x, MASK).item() == pytest.approx(2.5)


def test_masked_mean_empty_is_zero():
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0


def test_masked_var_hand_values():
    assert masked_var(X, MASK).item() == pytest.approx(10 / 4)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(10 / 5)
    assert masked_var(X, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])).item() == 0.0


def test_masked_var_stable_for_large_offset():
    # E[x^2] - E[x]^2 in float32 would cancel to garbage here.
    x = X + 1e4
    assert masked_var(x, MASK).item() == pytest.approx(2.5, rel=1e-4)


def test_masked_var_bf16_accumulates_in_float32():
    v = masked_var(X.bfloat16(), MASK)
    assert v.dtype == torch.float32 and v.item() == pytest.approx(2.5)


def test_masked_whiten_hand_values():
    out = masked_whiten(X, MASK)
    std = (2.0 + 1e-8) ** 0.5  # biased variance, as tf.nn.moments in lm-human-preferences
    expected = torch.tensor([[-2.0, -1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]]) / std
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(masked_whiten(X, MASK, shift_mean=False), (expected + 3.0) * MASK)
    assert masked_mean(out, MASK).abs().item() < 1e-6
    assert masked_var(out, MASK, unbiased=False).item() == pytest.approx(1.0, rel=1e-6)


def test_masked_whiten_unbiased_option():
    out = masked_whiten(X, MASK, unbiased=True)
    assert out[0, 0].item() == pytest.approx(-2.0 / 2.5**0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)
    # residuals (0.5, 0, -0.5): var 1/6; var(returns) 2/3 -> 1 - 1/4
    values = torch.tensor([[0.5, 2.0, 3.5, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.75)
    assert torch.isnan(explained_variance(returns, torch.ones_like(returns), mask))


class FakeAllReduce:
    """Simulates an all_reduce(SUM) across `world` ranks running in threads."""

    def __init__(self, world):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank):
        def reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before all have read
            return out

        return reduce


def run_ranks(fn, shards):
    group = FakeAllReduce(len(shards))
    results = [None] * len(shards)

    def worker(rank):
        x, m = shards[rank]
        results[rank] = fn(x, m, group.for_rank(rank))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return results


def test_distributed_reduce_matches_single_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(5) < lengths[:, None]).float()
    # Unequal token counts per rank: a mean of per-rank means would be wrong.
    shards = [(x[:1], mask[:1]), (x[1:], mask[1:])]

    for r in run_ranks(lambda a, m, red: masked_mean(a, m, reduce=red), shards):
        torch.testing.assert_close(r, masked_mean(x, mask))
    for unbiased in (True, False):
        for r in run_ranks(lambda a, m, red, unbiased=unbiased: masked_var(a, m, unbiased, reduce=red), shards):
            torch.testing.assert_close(r, masked_var(x, mask, unbiased))
    whitened = run_ranks(lambda a, m, red: masked_whiten(a, m, reduce=red), shards)
    torch.testing.assert_close(torch.cat(whitened), masked_whiten(x, mask))
    ev = run_ranks(lambda a, m, red: explained_variance(a * 0.5, a, m, reduce=red), shards)
    torch.testing.assert_close(ev[0], explained_variance(x * 0.5, x, mask))


def test_identity_reduce_is_noop():
    torch.testing.assert_close(masked_var(X, MASK, reduce=lambda t: t), masked_var(X, MASK))


def test_rl_package_does_not_import_lightning():
    code = (
        "import sys, lmforge.rl; "
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    )
    src = str(Path(lmforge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
