"""The MFU callback: a measured peak is re-measured at each log and the best rate kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lmforge.training.throughput as perf


class FakeModule:
    def __init__(self):
        self.device = torch.device("cpu")
        self.tokens_seen = 0
        self.logged: list[dict] = []

    def flops_per_token(self) -> float:
        return 1e6

    def log_dict(self, metrics, prog_bar=False):
        self.logged.append(dict(metrics))


def test_a_peak_measured_under_load_is_replaced_by_a_better_later_measurement(monkeypatch):
    rates = iter([50e9, 100e9, 80e9])  # at start (the cores were busy), then at each log
    monkeypatch.setattr(perf, "measure_matmul_peak", lambda device, dtype, **kw: next(rates))
    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0])
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    cb, module = perf.Throughput(every=10), FakeModule()
    trainer = SimpleNamespace(precision="32-true", global_step=0, world_size=1)
    cb.on_train_start(trainer, module)
    assert cb.peak == 50e9
    for step in (10, 20):
        trainer.global_step, module.tokens_seen = step, module.tokens_seen + 40_000
        cb.on_train_batch_end(trainer, module, None, None, 0)
    # 40,000 tokens/s x 1 MFLOP per token = 40 GFLOP/s, over the best peak measured so far
    assert [m["perf/tokens_per_s"] for m in module.logged] == [40_000, 40_000]
    assert [m["perf/mfu"] for m in module.logged] == [pytest.approx(0.4), pytest.approx(0.4)]
    assert cb.peak == 100e9


def test_emulated_bf16_on_a_cpu_is_measured_once(monkeypatch):
    calls = []
    monkeypatch.setattr(perf, "measure_matmul_peak", lambda device, dtype, **kw: calls.append(dtype) or 1e9)
    monkeypatch.setattr(perf, "cpu_has_fast_bf16", lambda: False)
    cb, module = perf.Throughput(every=1), FakeModule()
    trainer = SimpleNamespace(precision="bf16-mixed", global_step=0, world_size=1)
    cb.on_train_start(trainer, module)
    for step in (1, 2, 3):
        trainer.global_step, module.tokens_seen = step, module.tokens_seen + 100
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert calls == [torch.bfloat16] and len(module.logged) == 3
