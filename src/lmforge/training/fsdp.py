"""FSDP2 for ``strategy=fsdp``, all in one place: the Lightning strategy (`LmforgeFSDPStrategy`:
its device mesh and checkpoints in the single-process format), sharding a stage's models
(`shard_models`, the mixed-precision and CPU-offload policies) and gathering the parameters for
generation (`gathered_for_generation`). `lmforge.training.strategy` chooses and applies the
strategy (and holds DDP); the config and what DDP and FSDP share are in
`lmforge.training.distributed`.

Decision: ``fsdp`` is FSDP2 (``torch.distributed.fsdp.fully_shard``) applied in the
LightningModule's ``configure_model`` under Lightning's ``ModelParallelStrategy`` (with
tensor-parallel size 1), not Lightning's ``FSDPStrategy`` (FSDP1). FSDP2 is PyTorch's current
recommendation (per-parameter DTensor sharding, no flat parameters, so state-dict keys, weight
tying and frozen sub-networks stay simple), and ``FSDPStrategy`` refuses the CPU, while
ModelParallelStrategy + FSDP2 runs on CPU/gloo -- so the exact code the GPUs run is tested here.
What ``fsdp`` does (`shard_models`):

* every ``CausalLM``/``ScalarModel`` registered on the LightningModule (PPO: policy, critic) is
  sharded block by block (``model.backbone.blocks[i]``), then as a root (embeddings, final norm,
  heads); other trainable sub-modules (e.g. a value head) are sharded as their own units;
* ``sharding``: ``full`` (ZeRO-3: reshard after forward, re-gather in backward), ``grad_op``
  (ZeRO-2-like: keep gathered parameters from forward to backward), ``hybrid`` (HSDP: a 2-D mesh,
  replicated across nodes and sharded within a node: the all-gathers stay on NVLink);
* ``mixed_precision``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` when the
  trainer runs ``bf16-mixed`` on GPUs (``auto``), forced (``bf16``) or off (``none``); the
  sharded master weights and the optimizer state stay fp32;
* ``cpu_offload``: ``CPUOffloadPolicy`` (sharded parameters, gradients and the optimizer step on
  the CPU);
* checkpoints: by default (``save_distributed_checkpoint: false``) rank zero writes ONE
  consolidated file in the same format as single-process and DDP runs (full state dict, optimizer
  state keyed like ``torch.optim``), so it loads for single-process evaluation and generation, as
  ``init_from`` of the next stage, and resumes under any strategy; ``true`` writes a
  torch.distributed.checkpoint folder (one shard per rank, fast for very large models; turn it
  into one file with ``python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>``).

Generation under FSDP (sampling at validation, PPO rollouts) must not all-gather every block for
every decoded token: wrap it in ``with gathered_for_generation(model):`` (one all-gather per
block for the whole rollout, like FSDP1's ``summon_full_params``).
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lmforge.training.distributed import StrategyConfig, StrategyError, _LmforgeParallel, stage_models


class LmforgeFSDPStrategy(_LmforgeParallel, ModelParallelStrategy):
    """ModelParallelStrategy with data parallelism only (FSDP2 over all ranks; tensor-parallel
    size 1), lmforge's sharding applied by `StageModule.configure_model`, and consolidated
    checkpoints in the single-process format."""

    def __init__(self, cfg: StrategyConfig, timeout: timedelta | None = None):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=cfg.save_distributed_checkpoint,
            process_group_backend=cfg.process_group_backend,
            timeout=timeout,
        )
        self.lmforge_cfg = cfg
        self._hsdp_mesh = None

    def setup_environment(self) -> None:
        # Every rank is a data-parallel rank (Lightning's "auto" would make the devices of a node
        # a tensor-parallel group).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        self._check_same_run_dir(trainer)
        super().setup(trainer)

    def model_to_device(self) -> None:
        if self.lmforge_cfg.cpu_offload:
            # The sharded parameters live on the CPU by design; FSDP moves what it computes with.
            return
        super().model_to_device()

    @property
    def fsdp_mesh(self):
        """The mesh to shard over: 1-D over all ranks, or (nodes, devices per node) for HSDP."""
        if self.lmforge_cfg.sharding != "hybrid":
            return self.device_mesh["data_parallel"]
        if self._hsdp_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._hsdp_mesh = init_device_mesh(
                self.root_device.type, (self.num_nodes, self.num_processes), mesh_dim_names=("replicate", "shard")
            )
        return self._hsdp_mesh

    # -- checkpoints in the single-process format -----------------------------------------------
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.global_rank != 0:
            return {}
        return fqn_to_native_optim_state(osd, optimizer, self.model)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():  # a sharded folder: Lightning's distributed-checkpoint loader
            return super().load_checkpoint(path, weights_only=weights_only)
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=self.lightning_module.strict_loading)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for optimizer, native in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=native_to_fqn_optim_state(native, optimizer, self.model),
                options=options,
            )
        return checkpoint

    def teardown(self) -> None:
        super().teardown()
        self._lmforge_teardown()


def _param_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: n for n, p in model.named_parameters(remove_duplicate=True)}


def fqn_to_native_optim_state(osd: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A full optimizer state dict keyed by parameter names (torch.distributed.checkpoint) ->
    the format of ``optimizer.state_dict()``: parameters numbered in param-group order. This is
    what single-process and DDP checkpoints hold, so the checkpoints of all strategies are one
    format. (Lightning's ModelParallelStrategy numbers parameters in ``model.parameters()``
    order, which differs from the optimizer's whenever param groups reorder them -- lmforge's
    decay/no-decay groups do -- and a cross-strategy resume would pair moments with the wrong
    parameters.)"""
    names = _param_names(model)
    state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
        ids = []
        for p in group["params"]:
            name = names[p]
            if name in osd["state"]:
                state[index] = osd["state"][name]
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def native_to_fqn_optim_state(native: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The inverse of `fqn_to_native_optim_state`, for loading into a sharded model."""
    names = _param_names(model)
    if len(native["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(native['param_groups'])} parameter groups, this run's "
            f"has {len(optimizer.param_groups)}: it was written by a different optimizer configuration"
        )
    state, groups = {}, []
    for group, saved in zip(optimizer.param_groups, native["param_groups"]):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError("the checkpoint's optimizer parameter groups do not match this model's")
        fqns = []
        for p, pid in zip(group["params"], saved["params"]):
            name = names[p]
            if pid in native["state"]:
                state[name] = native["state"][pid]
            fqns.append(name)
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": fqns})
    return {"state": state, "param_groups": groups}


def fsdp_policies(cfg: StrategyConfig, precision: str, device_type: str) -> dict[str, Any]:
    """fully_shard keyword arguments of the configured mixed precision and offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if device_type == "cuda" and precision.startswith("bf16") else "none"
    kwargs: dict[str, Any] = {
        "mp_policy": (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if mp == "bf16"
            else MixedPrecisionPolicy()
        ),
        "offload_policy": (
            CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
        ),
    }
    return kwargs


def shard_model(model: nn.Module, mesh, cfg: StrategyConfig, precision: str = "32-true") -> nn.Module:
    """FSDP2 on one CausalLM / ScalarModel: each Transformer block a unit, then the model as the
    root unit (embeddings, final norm, heads). Also for models a stage keeps off the module's
    registered children (e.g. a frozen reference policy): every rank must shard it the same way
    and run its forward together (`strategy.fsdp_mesh` is the mesh)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):  # configure_model runs again for validate/test
        return model
    kwargs = fsdp_policies(cfg, precision, mesh.device_type)
    reshard = cfg.sharding != "grad_op"
    for block in model.backbone.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **kwargs)
    # The root keeps its parameters gathered from forward to backward, which starts with them
    # (None: FSDP's choice for a root, False).
    fully_shard(model, mesh=mesh, reshard_after_forward=None if reshard else False, **kwargs)
    return model


def shard_models(module: nn.Module, mesh, cfg: StrategyConfig, precision: str = "32-true") -> list[nn.Module]:
    """Apply FSDP2 to every stage model of `module`: each Transformer block, then the model as
    root; then any other trainable sub-module of `module` as its own unit. Returns the roots."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kwargs = fsdp_policies(cfg, precision, mesh.device_type)
    roots: list[nn.Module] = []
    models = stage_models(module)
    _check_same_initial_weights(models, mesh)
    for model in models:
        roots.append(shard_model(model, mesh, cfg, precision))
    # Trainable parameters outside the stage models (e.g. a value head on the module itself)
    # need their gradients reduced too: shard their sub-modules as units of their own.
    covered = {id(p) for m in roots for p in m.parameters()}
    for child in module.children():
        if isinstance(child, FSDPModule) and child not in roots:
            continue
        loose = [p for p in child.parameters() if p.requires_grad and id(p) not in covered]
        if loose:
            fully_shard(child, mesh=mesh, **kwargs)
            roots.append(child)
            covered |= {id(p) for p in child.parameters()}
    direct = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if direct:
        raise StrategyError(
            f"strategy=fsdp cannot shard the parameters {direct} held directly by {type(module).__name__}: "
            "put them in a sub-module (e.g. an nn.Linear) so it can be sharded as a unit"
        )
    return roots


def _check_same_initial_weights(models: list[nn.Module], mesh) -> None:
    """Each rank keeps its own slice of its own initial copy: all copies must be equal (DDP
    broadcasts rank zero's; FSDP does not). A cheap fingerprint, compared across ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch.distributed.tensor import DTensor

    sums = []
    for model in models:
        for p in model.parameters():
            if not isinstance(p, DTensor) and not p.is_meta:  # meta: materialized after sharding
                sums.append(p.detach().double().sum() + p.detach().double().abs().sum())
    if not sums:
        return
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    mine = torch.stack(sums).to(device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([float(not torch.allclose(mine, ref, rtol=1e-9, atol=0))], device=device)
    dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(
            "strategy=fsdp: the ranks built different initial weights (each rank shards its own copy). "
            "Seed every rank the same (run.main does) and load init_from on every rank."
        )


@contextmanager
def gathered_for_generation(module: nn.Module) -> Iterator[nn.Module]:
    """Gather an FSDP-sharded model's parameters once for a whole generation (or any run of
    forward passes without backward), instead of once per block per decoded token.

        with gathered_for_generation(self.model):
            out = generate(self.model, prompts, ...)

    Every rank must enter it (the all-gathers are collective), with the same number of FSDP
    units -- i.e. every rank generates, each its own prompts. Inside, each rank holds the full
    parameters (in the mixed-precision dtype when one is set), as with FSDP1's
    ``summon_full_params``; they are resharded on exit. A no-op for models that are not sharded
    (single, DDP), so stages can use it unconditionally."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield module
        return
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        saved.append(
            (state, state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups])
        )
        unit.set_reshard_after_forward(False, recurse=False)
    handles = [unit.unshard(async_op=True) for unit in units]
    for handle in handles:
        if handle is not None:
            handle.wait()
    try:
        yield module
    finally:
        for (state, auto, infos), unit in zip(saved, units):
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
            unit.reshard()
