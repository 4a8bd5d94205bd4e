"""Tokens/s and MFU of one pretraining step (forward + backward + AdamW), printed as JSON.

    python bench/train_step.py                       # target shape, fp32 and bf16, eager and compiled
    python bench/train_step.py --models target,tiny --dtypes fp32 --compile off --profile

MFU = achieved model FLOP/s / the dense-matmul peak of the same dtype measured in the same run
(bench/common.py), so the ratio means the same on any machine. Model FLOPs per token are
Transformer.flops_per_token (6 N + 12 L d T, PaLM appendix B).

Each variant also replays its step's matmuls alone, at their exact shapes (common.GemmReplay:
every Linear and the LM head forward and backward, QK^T and AV), round-robin with the steps.
`gemms_only_mfu` is the MFU a step that did nothing but its matmuls would reach on this machine,
the ceiling at this shape; `step_time_in_gemms` is the share of the step they account for.

The step is what PretrainModule.training_step does, minus Lightning's bookkeeping: the LM loss
(fp32 cross-entropy; chunked with --loss-chunks N), backward, gradient clipping, AdamW
(--optim-impls), zero_grad. Comma lists of variants are timed round-robin in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DTYPES,
    GemmReplay,
    bf16_usable,
    emit,
    machine,
    matmul_peak,
    model_config,
    pick_device,
    step_gemms,
    summary,
    time_calls,
)

from lmforge.model import CausalLM
from lmforge.training.optim import OptimConfig, build_adamw


def make_step(model: CausalLM, opt, batch: torch.Tensor, dtype: torch.dtype, device: torch.device, loss_chunk: int = 0):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    targets = batch[:, 1:]

    def step() -> None:
        with autocast:  # the loss is summed in fp32 whatever the autocast dtype
            loss = model(batch[:, :-1], targets=targets, loss_chunk=loss_chunk) / targets.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def top_ops(step, device: torch.device, n: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    return [{"op": e.key, "share": round(getattr(e, attr) / total, 3), "calls": e.count // 3} for e in events[:n]]


class Variant:
    """One (model, dtype, compile) configuration, built and warmed up, ready to time step by step."""

    def __init__(
        self,
        args,
        name: str,
        dtype_name: str,
        compiled: bool,
        optim_impl: str,
        attention: str,
        loss_chunk: int,
        device: torch.device,
    ):
        self.name, self.dtype_name, self.compiled = name, dtype_name, compiled
        self.optim_impl, self.attention, self.loss_chunk = optim_impl, attention, loss_chunk
        cfg = replace(model_config(name, args.seq), attention=attention)
        torch.manual_seed(0)
        self.model = CausalLM(cfg).to(device)
        opt = build_adamw(self.model, OptimConfig(lr=1e-4, impl=optim_impl))
        batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
        if compiled:
            self.model.compile()
        self.step = make_step(self.model, opt, batch, DTYPES[dtype_name], device, loss_chunk)
        t = time.perf_counter()
        self.step()  # compiled: the first call compiles forward and backward; counted apart
        self.first_step_s = time.perf_counter() - t
        time_calls(self.step, device, args.warmup, 0)
        self.times: list[float] = []
        self.tokens = args.batch * args.seq
        self.flops_per_token = self.model.backbone.flops_per_token(args.seq)
        self.gemms = GemmReplay(step_gemms(self.model, args.batch, args.seq), DTYPES[dtype_name], device)
        time_calls(self.gemms, device, 1, 0)
        self.gemm_times: list[float] = []

    def result(self, args, peak_flops: float) -> dict:
        stats = summary(self.times)
        tok_s = self.tokens / stats["median_s"]
        result = {
            "model": self.name,
            "params_M": round(self.model.backbone.num_params() / 1e6, 2),
            "dtype": self.dtype_name,
            "compile": self.compiled,
            "optim_impl": self.optim_impl,
            "attention": self.attention,
            "loss_chunk": self.loss_chunk,
            "batch": args.batch,
            "seq": args.seq,
            "step_median_s": round(stats["median_s"], 4),
            "step_best_s": round(stats["best_s"], 4),
            "tokens_per_s": round(tok_s, 1),
            "model_tflops_per_s": round(tok_s * self.flops_per_token / 1e12, 4),
            "mfu": round(tok_s * self.flops_per_token / peak_flops, 3),
            "mfu_best_step": round(self.tokens / stats["best_s"] * self.flops_per_token / peak_flops, 3),
        }
        # The same step's matmuls alone (GemmReplay): their MFU is the step's ceiling at these
        # shapes, and the step's time over theirs is what everything else costs.
        gemm_s = statistics.median(self.gemm_times)
        result |= {
            "gemm_flops_vs_model_flops": round(self.gemms.flops / (self.flops_per_token * self.tokens), 3),
            "gemms_only_median_s": round(gemm_s, 4),
            "gemms_only_mfu": round(self.gemms.flops / gemm_s / peak_flops, 3),
            "step_time_in_gemms": round(gemm_s / stats["median_s"], 3),
        }
        if self.compiled:
            result["compile_s"] = round(self.first_step_s, 1)
        return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="target", help="comma list: target, nano, tiny, gpt2-small, ...")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (the median counts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--optim-impls", default="auto", help="comma list of auto, fused, foreach, loop")
    p.add_argument("--attentions", default="auto", help="comma list of auto, sdpa, flash, eager")
    p.add_argument("--loss-chunks", default="0", help="comma list of algo.loss_chunk values (0 = full logits)")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true", help="add the top ops of 3 profiled steps")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    out: dict = {"bench": "train_step", "machine": machine(device), "peaks": {}, "results": [], "skipped": []}
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    sizes = [1024, 2048] if device.type == "cpu" else [4096, 8192]
    dtypes = []
    for dtype_name in args.dtypes.split(","):
        ok, why = bf16_usable(device) if dtype_name == "bf16" else (True, "")
        if ok:
            dtypes.append(dtype_name)
        else:
            peak = matmul_peak(device, DTYPES["bf16"], [256])
            out["skipped"].append({"dtype": "bf16", "why": why, "bf16_matmul_gflops": peak["by_size"]})
    variants = [
        Variant(args, name, d, c, o, a, int(lc), device)
        for d in dtypes
        for name in args.models.split(",")
        for c in compile_modes
        for o in args.optim_impls.split(",")
        for a in args.attentions.split(",")
        for lc in args.loss_chunks.split(",")
    ]
    # Round-robin: one step of every variant, then one peak sample per dtype, `steps` times, so
    # a machine whose speed drifts (turbo, neighbours) slows every figure alike.
    peaks: dict[str, list[float]] = {d: [] for d in dtypes}
    for _ in range(args.steps):
        for v in variants:
            v.times += time_calls(v.step, device, 0, 1)
            v.gemm_times += time_calls(v.gemms, device, 0, 1)
        for d in dtypes:
            peaks[d].append(matmul_peak(device, DTYPES[d], sizes, iters=3)["flops"])
    for d in dtypes:
        # The best matmul rate seen: the most conservative denominator.
        out["peaks"][d] = {
            "gflops": round(max(peaks[d]) / 1e9, 1),
            "median_gflops": round(statistics.median(peaks[d]) / 1e9, 1),
        }
    for v in variants:
        out["results"].append(v.result(args, max(peaks[v.dtype_name])))
    if args.profile:
        for v, r in zip(variants, out["results"]):
            r["top_ops"] = top_ops(v.step, device)
    emit(out)
    return out


if __name__ == "__main__":
    main()
