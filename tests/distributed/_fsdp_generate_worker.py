"""Worker of test_generation_gather: run as `python _fsdp_generate_worker.py <rank> <world> <port> <out>`.

Shards a nano CausalLM with lmforge's FSDP2 plan over gloo, generates with and without
`gathered_for_generation`, and writes the all-gather counts and the tokens to <out>.rank<r>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.model import CausalLM, ModelConfig, generate
    from lmforge.training.distributed import StrategyConfig
    from lmforge.training.fsdp import gathered_for_generation, shard_models

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=64, d_ff=128, vocab_size=97, max_seq_len=64)
    reference = CausalLM(cfg)
    holder = torch.nn.Module()
    holder.model = CausalLM(cfg)
    holder.model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    shard_models(holder, mesh, StrategyConfig(name="fsdp"))

    # Count FSDP's all-gathers where FSDP2 issues them (one call per unit and gather).
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_groups

    calls = {"n": 0}
    real = fsdp_groups.foreach_all_gather

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    fsdp_groups.foreach_all_gather = counting
    prompts = [[1, 2, 3], [4, 5]]
    kw = dict(max_new_tokens=12, eos_id=0, pad_id=0, temperature=0.0)
    plain = generate(holder.model, prompts, **kw)
    per_token = calls["n"]
    calls["n"] = 0
    with gathered_for_generation(holder.model):
        gathered = generate(holder.model, prompts, **kw)
    once = calls["n"]
    fsdp_groups.foreach_all_gather = real
    expected = generate(reference, prompts, **kw)
    # Training still works after the context: parameters are sharded again.
    from torch.distributed.tensor import DTensor

    resharded = all(isinstance(p, DTensor) for p in holder.model.parameters())
    loss = holder.model(torch.tensor([[1, 2, 3, 4]])).float().logsumexp(-1).mean()
    loss.backward()
    torch.save(
        {
            "per_token": per_token,
            "once": once,
            "plain": plain.sequences,
            "gathered": gathered.sequences,
            "expected": expected.sequences,
            "resharded": resharded,
            "grads": all(p.grad is not None for p in holder.model.parameters()),
        },
        f"{out}.rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
