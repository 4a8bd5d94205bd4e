"""Throughput and model-FLOPs utilization (MFU).

MFU = achieved model FLOP/s / peak FLOP/s. The achieved rate counts the model's training FLOPs
(6N + attention, see Transformer.flops_per_token) per token times tokens/s. The peak comes from
a table for known GPUs, or is *measured* (a dense matmul at the training dtype) where no table
applies, e.g. on a CPU, so the ratio means the same thing on any machine.
"""

from __future__ import annotations

import functools
import time

import lightning as L
import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, iters: int = 8) -> float:
    """FLOP/s of an n x n x n matmul at `dtype` on `device` (best of `iters`)."""
    # A private generator: measuring must not advance the global RNG (dropout masks, sampling),
    # or a run that measures (a fresh process) and one that does not (a cached probe) diverge.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = float("inf")
    for _ in range(iters + 1):  # the first call warms up caches / kernels and is not counted
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU (AVX512-BF16 / AMX): measured, not guessed from
    flags, since without native support bf16 is emulated and ~100x slower than fp32. Natively it
    is 2-4x faster, so a 1.5x threshold separates the two cases with room to spare. ~50 ms."""
    cpu = torch.device("cpu")
    fp32 = measure_matmul_peak(cpu, torch.float32, n=256, iters=3)
    bf16 = measure_matmul_peak(cpu, torch.bfloat16, n=256, iters=3)
    return bf16 > 1.5 * fp32


def table_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The data-sheet peak of a known GPU at `dtype`; None where no table entry applies."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if dtype in (torch.bfloat16, torch.float16) else value / 2
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    return table_peak(device, dtype) or measure_matmul_peak(device, dtype)


def precision_dtype(precision: str) -> torch.dtype:
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32


class Throughput(L.Callback):
    """Logs perf/tokens_per_s (all ranks together) and perf/mfu every `every` optimizer steps.

    Reads `pl_module.tokens_seen` (tokens this rank processed) and `pl_module.flops_per_token()`.
    A measured peak (no GPU table entry) is measured again at every log and the best rate kept:
    one measurement taken while something else used the cores would understate the peak and
    overstate MFU for the whole run (most likely why a reward run once logged MFU 0.93). ~30 ms a time.
    """

    def __init__(self, every: int = 10):
        self.every = every
        self.peak: float | None = None
        self._measured = False
        self._dtype = torch.float32
        self._t0: float | None = None
        self._tokens0 = 0
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        device = pl_module.device
        self._dtype = precision_dtype(trainer.precision)
        table = table_peak(device, self._dtype)
        self.peak = table or measure_matmul_peak(device, self._dtype)
        # Re-measured at each log unless it came from the table; emulated bf16 on a CPU takes
        # seconds to measure (and its MFU means little), so it is measured once.
        emulated = device.type == "cpu" and self._dtype != torch.float32 and not cpu_has_fast_bf16()
        self._measured = table is None and not emulated
        self._t0, self._tokens0 = time.perf_counter(), pl_module.tokens_seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Called per micro-batch; with gradient accumulation several share one optimizer step.
        if self._t0 is None or step == 0 or step % self.every or step == self._last_step:
            return
        self._last_step = step
        now = time.perf_counter()
        dt = now - self._t0
        tokens = (pl_module.tokens_seen - self._tokens0) * trainer.world_size
        if dt <= 0 or tokens <= 0:
            return
        tps = tokens / dt
        metrics = {"perf/tokens_per_s": tps}
        if self._measured:
            self.peak = max(self.peak or 0.0, measure_matmul_peak(pl_module.device, self._dtype, iters=2))
        if self.peak:
            # MFU per device: the whole job's FLOP rate over the peak of all devices.
            metrics["perf/mfu"] = tps * pl_module.flops_per_token() / (self.peak * trainer.world_size)
        pl_module.log_dict(metrics, prog_bar=False)
        self._t0, self._tokens0 = time.perf_counter(), pl_module.tokens_seen  # the measuring not counted
