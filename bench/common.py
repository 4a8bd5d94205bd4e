"""What the bench scripts share: the machine description, timing, the matmul peak, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lmforge.model import ModelConfig
from lmforge.training.throughput import cpu_has_fast_bf16, measure_matmul_peak

# The shape the performance targets are stated at (bench/README.md): d_model 256, 4 layers,
# 4 heads, vocabulary 4096, GPT-2 style (gelu MLP of 4 d_model, learned positions, tied head).
TARGET = ModelConfig(
    n_layer=4,
    n_head=4,
    n_kv_head=4,
    d_model=256,
    d_ff=1024,
    vocab_size=4096,
    max_seq_len=1024,
    norm="layernorm",
    pos="learned",
    activation="gelu",
    bias=False,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config(name: str, max_seq_len: int | None = None) -> ModelConfig:
    """`target` or any conf/model/<name>.yaml, read without Hydra."""
    if name == "target":
        cfg = TARGET
    else:
        from omegaconf import OmegaConf

        path = os.path.join(os.path.dirname(__file__), "..", "conf", "model", f"{name}.yaml")
        fields = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
        cfg = ModelConfig(**fields)
    if max_seq_len is not None and cfg.max_seq_len < max_seq_len:
        from dataclasses import replace

        cfg = replace(cfg, max_seq_len=max_seq_len)
    return cfg


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of fn, `iters` of them after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "best_s": min(times), "n": len(times)}


def matmul_peak(device: torch.device, dtype: torch.dtype, shapes: list[int], iters: int = 10) -> dict:
    """The dtype's dense-matmul FLOP rate on this device: best over square matmuls of the given
    sizes, each best of several calls. The denominator of every MFU figure."""
    rates = {n: measure_matmul_peak(device, dtype, n=n, iters=iters) for n in shapes}
    return {"flops": max(rates.values()), "by_size": {str(n): round(r / 1e9, 1) for n, r in rates.items()}}


def step_gemms(model: torch.nn.Module, batch: int, seq: int) -> list[tuple[int, int, int, int]]:
    """Every matmul of a training step of `model` (a CausalLM) as (batch, M, K, N): each Linear and
    the LM head forward (X W^T) and backward (dX = dY W, dW = dY^T X), and per layer QK^T and AV
    forward and backward (full T x T, as flops_per_token counts them). Their FLOPs sum to
    flops_per_token(seq) * batch * seq."""
    cfg = model.backbone.cfg
    tokens = batch * seq
    gemms = []
    # The backbone's Linears and the LM head (wte's weight when tied), as flops_per_token counts them.
    weights = [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(model.lm_head_weight)
    for w in weights:
        n_out, n_in = w.shape
        gemms += [(1, tokens, n_in, n_out), (1, tokens, n_out, n_in), (1, n_out, tokens, n_in)]
    bh, d = batch * cfg.n_head, cfg.head_dim
    for _ in range(cfg.n_layer):
        # forward S = Q K^T, O = P V; backward dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
        gemms += [(bh, seq, d, seq), (bh, seq, seq, d)] + [(bh, seq, d, seq), (bh, seq, seq, d)] * 2
    return gemms


class GemmReplay:
    """The step's matmuls (step_gemms) on random operands, run back to back: the time a step
    would take if it did nothing but its matmuls at this library's speed for these shapes. It
    is the ceiling of the step's MFU, and what remains is the non-matmul work."""

    def __init__(self, gemms: list[tuple[int, int, int, int]], dtype: torch.dtype, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(0)

        def operands(b: int, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.randn(b, m, k, device=device, dtype=dtype, generator=gen),
                torch.randn(b, k, n, device=device, dtype=dtype, generator=gen),
            )

        if device.type == "cuda":
            # One pair per distinct shape: gpt2-small's T x T attention operands would take
            # gigabytes, and a GPU's caches are too small for the reuse to matter.
            by_shape = {g: operands(*g) for g in set(gemms)}
            self.operands = [by_shape[g] for g in gemms]
        else:  # own operands per matmul, as the step has: shared ones would stay in cache
            self.operands = [operands(*g) for g in gemms]
        self.flops = sum(2 * b * m * k * n for b, m, k, n in gemms)

    def __call__(self) -> None:
        for a, b in self.operands:
            torch.bmm(a, b)


def bf16_usable(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(), "cuda"
    if cpu_has_fast_bf16():
        return True, "native bf16 on this CPU"
    return False, (
        f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16: bf16 matmuls are "
        "emulated and far slower than fp32, so bf16 figures would measure the emulation"
    )


def machine(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def emit(result: dict) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
