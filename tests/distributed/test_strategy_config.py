"""The strategy group without processes: configs compose, the global batch arithmetic, the
checkpoint optimizer-state format, activation checkpointing, rank-zero detection."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from lmforge.model import CausalLM, ModelConfig
from lmforge.training.distributed import StrategyConfig, StrategyError, env_rank_is_zero, nonzero_rank_hydra_overrides
from lmforge.training.fsdp import LmforgeFSDPStrategy, fqn_to_native_optim_state, native_to_fqn_optim_state
from lmforge.training.optim import OptimConfig, build_adamw
from lmforge.training.strategy import (
    LmforgeDDPStrategy,
    accumulation_for,
    build_strategy,
    checkpoint_blocks,
    world_size_of,
)

ROOT = Path(__file__).resolve().parents[2]
NANO = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=50, max_seq_len=32)


@pytest.mark.parametrize("name,cls", [("single", str), ("ddp", LmforgeDDPStrategy), ("fsdp", LmforgeFSDPStrategy)])
def test_strategy_group_composes_and_builds(name, cls):
    cfg = compose_config([f"strategy={name}", "trainer=cpu"])
    assert cfg.strategy.name == name
    assert isinstance(build_strategy(OmegaConf.to_object(cfg.strategy)), cls)


def test_hardware_configs_compose():
    assert compose_config(["trainer=gpu"]).trainer.accelerator == "gpu"
    multi = compose_config(["trainer=multinode", "trainer.num_nodes=4", "strategy=fsdp", "strategy.sharding=hybrid"])
    assert (multi.trainer.num_nodes, multi.trainer.precision, multi.strategy.sharding) == (4, "bf16-mixed", "hybrid")
    # The submitit launcher config is only read when selected (hydra-submitit-launcher is an extra).
    assert (ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").is_file()


def test_bad_strategy_values_are_refused():
    with pytest.raises(StrategyError, match="strategy.sharding"):
        build_strategy(StrategyConfig(name="fsdp", sharding="zero3"))
    with pytest.raises(Exception, match="strategy"):
        compose_config(["strategy=fsdp", "strategy.shardng=full"])  # a typo fails at compose time


def test_accumulation_keeps_the_global_batch():
    assert accumulation_for(None, 8, 4, accumulate=3) == 3
    assert accumulation_for(64, 8, 1) == 8
    assert accumulation_for(64, 8, 2) == 4
    assert accumulation_for(64, 8, 8) == 1
    with pytest.raises(StrategyError, match="not a multiple of algo.batch_size x world size = 8 x 3 = 24"):
        accumulation_for(64, 8, 3)
    with pytest.raises(StrategyError, match="contradicts"):
        accumulation_for(64, 8, 2, accumulate=2)


def test_world_size_before_start(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    t = OmegaConf.create({"accelerator": "cpu", "devices": 2, "num_nodes": 3})
    assert world_size_of(t) == 6
    assert world_size_of(OmegaConf.create({"accelerator": "cpu", "devices": [0, 1], "num_nodes": 1})) == 2
    assert world_size_of(OmegaConf.create({"accelerator": "cpu", "devices": "auto", "num_nodes": 1})) == 1
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert world_size_of(t) == 16


def test_rank_zero_from_the_environment(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_rank_is_zero() and nonzero_rank_hydra_overrides() == []
    monkeypatch.setenv("NODE_RANK", "1")
    assert not env_rank_is_zero()
    assert "hydra.output_subdir=null" in nonzero_rank_hydra_overrides()


def test_optimizer_state_formats_round_trip():
    """Consolidated FSDP checkpoints store optimizer state numbered like torch.optim (param-group
    order, which lmforge's decay/no-decay groups make differ from model.parameters() order)."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = CausalLM(NANO)
    opt = build_adamw(holder.model, OptimConfig())
    holder.model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    native = opt.state_dict()
    names = {p: n for n, p in holder.named_parameters()}
    order = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in order] != [id(p) for p in holder.parameters()]  # the case that needs care
    by_name = native_to_fqn_optim_state(native, opt, holder)
    for i, p in enumerate(order):
        assert torch.equal(by_name["state"][names[p]]["exp_avg"], native["state"][i]["exp_avg"])
    back = fqn_to_native_optim_state(by_name, opt, holder)
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in native["param_groups"]]
    for i, s in native["state"].items():
        assert torch.equal(back["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
    fresh = build_adamw(holder.model, OptimConfig())
    fresh.load_state_dict(back)  # what a single-process / DDP resume does


def test_activation_checkpointing_changes_memory_not_math():
    torch.manual_seed(0)
    plain = CausalLM(NANO)
    ckpt = copy.deepcopy(plain)
    checkpoint_blocks(ckpt)
    checkpoint_blocks(ckpt)  # idempotent
    x = torch.randint(0, 50, (2, 16))
    for m in (plain, ckpt):
        m(x).float().logsumexp(-1).mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    assert set(plain.state_dict()) == set(ckpt.state_dict())  # names unchanged
    # A deep copy (the PPO reference model) computes with its own weights.
    twin = copy.deepcopy(ckpt)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert twin.backbone.blocks[0].forward.__self__ is twin.backbone.blocks[0]
    assert not torch.equal(twin(x), ckpt(x))
