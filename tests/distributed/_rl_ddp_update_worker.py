"""Worker of test_rl_update_ddp: `python _rl_ddp_update_worker.py <rank> <world> <port> <out> <policy> <cache> <dir>`.

For each RL stage: builds the module (nano policy), samples one rollout of 16 responses of
unequal lengths (the same on every rank: no process group yet), computes its advantages, and
the gradient of one update over all 16 rows in this one process (the reference). Then, in a
gloo process group, each rank takes 8 of the rows (rank 0 the longest responses, rank 1 the
shortest: the ranks hold different token counts) in micro-batches of 2 through DDP (gradients
averaged at the last micro-batch, `no_sync` before), with the update's denominators from
`RLStageModule.update_norm` (one all-reduce), and writes both gradients to <out>.rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "algos")]

ALGOS = {
    "ppo": ["algo.critic=policy_head"],
    "reinforce": [],
    "rloo": [],
    "grpo": [],
    "dr-grpo": ["algo.scale_rewards=false", "algo.loss_agg=seq-mean-token-sum-norm"],
}
ROWS, MICRO = 16, 2
LENGTHS = [6, 1, 6, 1, 2, 5, 3, 4]


class LossOf(nn.Module):
    """DDP wraps a module and syncs gradients of what its forward computed: the stage's loss."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, mb):
        return self.module.loss(mb)


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def build(algo: str, assets: dict, run_dir: Path):
    import importlib

    from test_rollout import FirstTokenReward, cut_responses, rl_config

    from lmforge.algos import STAGES
    from lmforge.rewards.reward_function import RewardFunction

    name = "grpo" if algo == "dr-grpo" else algo
    k = 1 if name in ("ppo", "reinforce") else 4
    cfg = rl_config(
        name,
        assets,
        run_dir,
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
        f"algo.rollout_batch_size={ROWS // k}",
        f"algo.samples_per_prompt={k}",
        f"algo.minibatch_size={ROWS}",
        f"algo.micro_batch_size={MICRO}",
        "algo.max_new_tokens=6",
        "algo.temperature=0.7",
        "algo.kl_coef=0.1",
        *ALGOS[algo],
    )
    module, dm = importlib.import_module(STAGES[name]).build(cfg, run_dir)
    module.reward = RewardFunction([(FirstTokenReward(set(range(4, cfg.model.vocab_size, 2))), 1.0)])
    cut_responses(module, LENGTHS)
    ro, _ = module.make_rollout(dm.train_prompts[: ROWS // k], step=0)
    module.compute_advantages(ro)
    return module, ro


def main(rank: int, world: int, port: int, out: str, policy: str, cache: str, tmp: str) -> None:
    assets = {"policy": policy, "cache": cache}
    cases = {}
    for algo in ALGOS:
        module, ro = build(algo, assets, Path(tmp) / f"{algo}-rank{rank}")
        fields, P = module.minibatch_fields(ro), ro.prompt_len
        everything = module.take(fields, torch.arange(ro.size), P)
        everything["norm"] = module.update_norm(ro.response_mask)  # no process group: this rank's rows
        module.loss(everything)[0].backward()
        cases[algo] = (module, ro, grads(module))
        module.zero_grad(set_to_none=True)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    for algo, (module, ro, reference) in cases.items():
        ddp = nn.parallel.DistributedDataParallel(LossOf(module))
        order = torch.argsort(ro.lengths(), descending=True, stable=True)
        rows = order.chunk(world)[rank]  # rank 0: the longest responses
        fields = module.minibatch_fields(ro)
        norm = module.update_norm(ro.response_mask[rows])
        micro = rows.split(MICRO)
        for i, idx in enumerate(micro):
            mb = module.take(fields, idx, ro.prompt_len)
            mb["norm"] = norm
            if i < len(micro) - 1:
                with ddp.no_sync():
                    ddp(mb)[0].backward()
            else:
                ddp(mb)[0].backward()
        tokens = torch.tensor([float(ro.response_mask[rows].sum())])
        dist.all_reduce(tokens)
        result[algo] = {
            "reference": reference,
            "ddp": grads(module),
            "rank_tokens": float(ro.response_mask[rows].sum()),
            "tokens": float(tokens),
            "sequences": ro.sequences,
        }
    torch.save(result, f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    r, w, port, out, policy, cache, tmp = sys.argv[1:8]
    main(int(r), int(w), int(port), out, policy, cache, tmp)
