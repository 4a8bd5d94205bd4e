"""How much length bucketing (algo.packing=bucket) saves over plain batches in SFT.

    python bench/sft_packing.py [--model nano] [--n 2000] [--batch-size 32] [--steps 8]

Builds the SFT training examples of the configured data (synthetic by default) exactly as the
stage does, then for each batching mode reports:

* pad_fraction: padded share of the token slots over one whole epoch plan (exact, no timing);
* real_tokens_per_s: non-pad tokens per second of training steps (forward, backward, AdamW)
  on the CPU/GPU here, timed over --steps batches per mode, the modes interleaved step by step
  so a busy machine slows them alike.

Modes: `fixed` (every batch padded to algo.seq_len: the naive baseline), `none` (shuffled
batches padded to their longest example: algo.packing=none) and `bucket` (length-bucketed
batches: algo.packing=bucket). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.algos.sft import sft_loss_terms  # noqa: E402
from lmforge.data.sft_data import IGNORE_INDEX, TrainBatches, encode_pairs, load_pairs, plan_epoch  # noqa: E402
from lmforge.data.templates import BadRecords  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lmforge.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    return {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
        "labels": F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
        "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=False),
    }


def pad_fraction(plan, lengths, fixed: int | None = None) -> float:
    real = sum(lengths[i] for b in plan for i in b)
    slots = sum(len(b) * (fixed or max(lengths[i] for i in b)) for b in plan)
    return 1.0 - real / slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nano")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--n", type=int, default=2000, help="SFT examples (data.n_sft)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.path=x.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [
        f"model={args.model}",
        f"data={args.data}",
        "algo=sft",
        f"algo.batch_size={args.batch_size}",
        f"algo.seq_len={args.seq_len}",
        *args.overrides,
    ]
    if args.data == "synthetic":
        overrides += [f"data.n_sft={args.n}", "data.n_docs=2000"]
    cfg = compose(overrides)

    from lmforge.algos.base import model_config
    from lmforge.algos.sft import sft_tokenizer
    from lmforge.model import CausalLM
    from lmforge.training.optim import OptimConfig, build_adamw

    tok = sft_tokenizer(cfg)
    train_pairs, _ = load_pairs(cfg.data, 0)
    examples = encode_pairs(train_pairs[: args.n], tok, args.seq_len, BadRecords(cfg.data.on_bad_record))
    lengths = [e.n_inputs for e in examples]
    bs = args.batch_size

    plans = {
        "fixed": plan_epoch(lengths, bs, "none", 0, 0),
        "none": plan_epoch(lengths, bs, "none", 0, 0),
        "bucket": plan_epoch(lengths, bs, "bucket", 0, 0, cfg.algo.bucket_size),
    }
    result = {
        "model": args.model,
        "data": args.data,
        "n_examples": len(examples),
        "batch_size": bs,
        "seq_len": args.seq_len,
        "example_len": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 2), "max": max(lengths)},
        "torch_threads": torch.get_num_threads(),
        "modes": {},
    }
    for mode, plan in plans.items():
        result["modes"][mode] = {
            "pad_fraction": round(pad_fraction(plan, lengths, args.seq_len if mode == "fixed" else None), 4),
            "batches_per_epoch": len(plan),
        }

    mc = model_config(cfg)
    models = {}
    streams = {}
    for mode in plans:
        torch.manual_seed(0)
        m = CausalLM(mc).train()
        models[mode] = (m, build_adamw(m, OptimConfig(lr=1e-4)))
        packing = "bucket" if mode == "bucket" else "none"
        streams[mode] = iter(TrainBatches(examples, bs, packing, 0, tok.pad_id, bucket_size=cfg.algo.bucket_size))

    def step(mode: str) -> tuple[float, int, int]:
        batch = next(streams[mode])
        if mode == "fixed":
            batch = pad_to(batch, args.seq_len, tok.pad_id)
        m, opt = models[mode]
        t = time.perf_counter()
        total, count = sft_loss_terms(m, batch)
        (total / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, int(batch["attention_mask"].sum()), batch["input_ids"].numel()

    for mode in plans:  # warm-up, not timed
        step(mode)
    acc = {mode: [0.0, 0, 0] for mode in plans}
    for _ in range(args.steps):
        for mode in plans:
            dt, real, slots = step(mode)
            a = acc[mode]
            a[0] += dt
            a[1] += real
            a[2] += slots
    for mode, (secs, real, slots) in acc.items():
        r = result["modes"][mode]
        r["timed_steps"] = args.steps
        r["step_s"] = round(secs / args.steps, 4)
        r["real_tokens_per_s"] = round(real / secs, 1)
        r["timed_pad_fraction"] = round(1 - real / slots, 4)
    modes = result["modes"]
    result["speedup_bucket_vs_none"] = round(
        modes["bucket"]["real_tokens_per_s"] / modes["none"]["real_tokens_per_s"], 3
    )
    result["speedup_bucket_vs_fixed"] = round(
        modes["bucket"]["real_tokens_per_s"] / modes["fixed"]["real_tokens_per_s"], 3
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
