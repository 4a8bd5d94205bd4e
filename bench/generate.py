"""Rollout generation tokens/s: KV cache vs recomputing the whole context, printed as JSON.

    python bench/generate.py                                  # nano, batch 1..64, 256 new tokens
    python bench/generate.py --model tiny --batches 1,16 --recompute-batches 16 --static

Every row generates exactly --new-tokens tokens (no EOS can stop it), from prompts of
--prompt-len tokens. `cache` is lmforge's default decoding (one prefill, then one token per step
through the KV cache); `recompute` reruns the model over the whole context at every step
(generate(use_cache=False)), what decoding costs without a cache; `static` (--static) is the
static-shape cache torch.compile needs, run eagerly (--compile adds a compiled static run).
Recomputation grows quadratically with length, so it is timed only at --recompute-batches.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, emit, machine, model_config, pick_device, sync

from lmforge.model import CausalLM, generate


def timed_generate(model, prompts, args, device, **kwargs) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    sync(device)
    t = time.perf_counter()
    with autocast:
        out = generate(
            model,
            prompts,
            max_new_tokens=args.new_tokens,
            eos_id=-1,
            pad_id=0,
            temperature=1.0,
            generator=gen,
            **kwargs,
        )
    sync(device)
    elapsed = time.perf_counter() - t
    assert int(out.response_mask.sum()) == len(prompts) * args.new_tokens  # no row stopped early
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--recompute-batches", default="16")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--static", action="store_true", help="also time the static-shape cache")
    p.add_argument("--compile", action="store_true", help="also time a compiled model with the static cache")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per point (the best counts)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cfg = replace(model_config(args.model), max_seq_len=args.prompt_len + args.new_tokens)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(device).eval()
    out: dict = {
        "bench": "generate",
        "machine": machine(device),
        "model": args.model,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "results": [],
    }
    recompute_at = {int(b) for b in args.recompute_batches.split(",") if b}
    modes = [("cache", model, {})]
    if args.static:
        modes.append(("static", model, {"static_cache": True}))
    if args.compile:
        compiled = CausalLM(cfg).to(device).eval()
        compiled.load_state_dict(model.state_dict())
        compiled.compile(dynamic=False)
        modes.append(("static+compile", compiled, {"static_cache": True}))
    for b in (int(x) for x in args.batches.split(",")):
        prompts = torch.randint(1, cfg.vocab_size, (b, args.prompt_len)).tolist()
        row: dict = {"batch": b}
        timed_generate(model, prompts[:1], argparse.Namespace(**{**vars(args), "new_tokens": 4}), device)  # warm up
        for name, m, kwargs in modes:
            if name == "static+compile":  # compiles for this batch size first
                t = time.perf_counter()
                timed_generate(m, prompts, args, device, **kwargs)
                row["compile_s"] = round(time.perf_counter() - t, 1)
            best = min(timed_generate(m, prompts, args, device, **kwargs) for _ in range(args.repeats))
            row[f"{name}_tokens_per_s"] = round(b * args.new_tokens / best, 1)
        if b in recompute_at:
            best = min(timed_generate(model, prompts, args, device, use_cache=False) for _ in range(1))
            row["recompute_tokens_per_s"] = round(b * args.new_tokens / best, 1)
            row["cache_speedup"] = round(row["cache_tokens_per_s"] / row["recompute_tokens_per_s"], 1)
        out["results"].append(row)
    emit(out)
    return out


if __name__ == "__main__":
    main()
