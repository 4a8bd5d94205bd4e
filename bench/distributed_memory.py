"""Per-rank memory and step time of single / DDP / FSDP training, printed as JSON.

    python bench/distributed_memory.py --model gpt2-small --world 2 --steps 3 --batch 2 --seq 64
    python bench/distributed_memory.py --model nano --world 2 --steps 20 --batch 4 --seq 64   # overhead

Each strategy runs in fresh processes (gloo on CPU, nccl on GPUs) with lmforge's own wrapping:
DDP as conf/strategy/ddp.yaml configures it, FSDP through `lmforge.training.fsdp.shard_models` (per-block
FSDP2, full sharding). Every rank trains `--steps` AdamW steps on random tokens of its own. Reported
per rank (the largest over ranks):

* params_mb / grads_mb / optim_mb: bytes of the tensors this rank holds (local shards under FSDP),
  the "parameters + gradients + optimizer state" that sharding divides;
* peak_rss_mb: the process's peak resident memory (includes the framework, activations, and,
  unless --meta-init, the full initial model FSDP shards from -- lmforge's stages build it so);
* peak_cuda_mb: torch.cuda.max_memory_allocated on GPUs;
* peak_rss_by_phase_mb: rank 0's peak RSS after init, the first forward, backward and optimizer step;
* step_s: median wall time of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def model_config(name: str):
    from omegaconf import OmegaConf

    from lmforge.model import ModelConfig

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    raw.pop("defaults", None)
    return ModelConfig(**raw)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def tensor_mb(tensors) -> float:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total / 2**20


def worker(rank: int, world: int, port: int, args, strategy: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from lmforge.model import CausalLM
    from lmforge.training.distributed import StrategyConfig
    from lmforge.training.fsdp import shard_models
    from lmforge.training.optim import OptimConfig, build_adamw

    cfg = model_config(args.model)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    holder = torch.nn.Module()
    meta = strategy == "fsdp" and args.meta_init
    with torch.device("meta") if meta else torch.device("cpu"):
        holder.model = CausalLM(cfg)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        shard_models(holder, init_device_mesh(device.type, (world,)), StrategyConfig(name="fsdp"))
        if meta:  # materialize only this rank's shards, then initialize them
            holder.model.to_empty(device=device)
            holder.model.backbone.init_weights()
        model = holder.model
    else:
        holder.model.to(device)
        model = holder.model
        if strategy == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(
                holder.model, device_ids=[rank] if cuda else None, gradient_as_bucket_view=True, static_graph=True
            )
    opt = build_adamw(holder.model, OptimConfig(impl=args.optim_impl))
    gen = torch.Generator().manual_seed(1000 + rank)
    times = []
    phases = {"after_init": peak_rss_mb()}
    for step in range(args.steps):
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        del logits
        if step == 0:
            phases["after_forward"] = peak_rss_mb()
        loss.backward()
        if step == 0:
            phases["after_backward"] = peak_rss_mb()
        grads_mb = tensor_mb(p.grad for p in holder.model.parameters())
        opt.step()
        if step == 0:
            phases["after_optimizer_step"] = peak_rss_mb()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {
        "rank": rank,
        "params_mb": round(tensor_mb(holder.model.parameters()), 1),
        "grads_mb": round(grads_mb, 1),
        "optim_mb": round(tensor_mb(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_model_mb": round(rss_start, 1),
        "step_s": round(statistics.median(times[1:] or times), 4),
        "peak_rss_by_phase_mb": phases,
    }
    if cuda:
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    queue.put(result)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(strategy: str, world: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, strategy, queue)) for r in range(world)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    per_rank = sorted(results, key=lambda r: r["rank"])
    keys = [k for k in per_rank[0] if k != "rank"]
    out = {"strategy": strategy, "world_size": world, "wall_s": round(time.perf_counter() - start, 1)}
    out.update({k: max(r[k] for r in per_rank) for k in keys if k != "peak_rss_by_phase_mb"})
    out["peak_rss_by_phase_mb"] = per_rank[0]["peak_rss_by_phase_mb"]  # rank 0
    out["state_mb"] = round(out["params_mb"] + out["grads_mb"] + out["optim_mb"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--strategies", default="single,ddp,fsdp")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even with GPUs")
    ap.add_argument(
        "--optim-impl",
        default="foreach",
        choices=["foreach", "loop", "fused"],
        help="AdamW implementation: foreach keeps whole-model temporaries, loop one tensor's",
    )
    ap.add_argument(
        "--meta-init",
        action="store_true",
        help="fsdp: build the model on the meta device and materialize only the local shards "
        "(no full copy per rank; how very large models must be built)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: CPUs / world size)")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    rows = []
    for strategy in args.strategies.split(","):
        world = 1 if strategy == "single" else args.world
        rows.append(run(strategy, world, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {
        "model": args.model,
        "batch_per_rank": args.batch,
        "seq_len": args.seq,
        "steps": args.steps,
        "meta_init": args.meta_init,
        "device": "cuda" if torch.cuda.is_available() and not args.cpu else "cpu",
        "results": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
