"""The `strategy` config group -> a Lightning strategy, and what every stage needs to run on many
processes: sharding, activation checkpointing, the global batch, and rank-zero-only outputs.

Strategies (conf/strategy/*.yaml):

* ``single``: one process, one device (Lightning's "auto" with ``trainer.devices=1``).
* ``ddp``: DistributedDataParallel, one process per device. Gradients are all-reduced straight out
  of the buckets (``gradient_as_bucket_view``), ``find_unused_parameters`` is off (lmforge models
  use every parameter), and ``static_graph`` is on where it is safe: automatic optimization
  without gradient accumulation (DDP's static-graph reducer fails under the ``no_sync`` of
  accumulation micro-batches -- measured), off for the manual-optimization RL stages (several
  forwards/backwards of different sub-networks per step).
* ``fsdp``: fully sharded data parallelism -- parameters, gradients and optimizer state sharded
  across ranks.

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
* ``activation_checkpointing`` (any strategy): each block's activations are recomputed in the
  backward pass (``torch.utils.checkpoint``, non-reentrant) instead of stored;
* checkpoints: by default (``save_distributed_checkpoint: false``) rank zero writes ONE
  consolidated file in the same format as single-process and DDP runs (full state dict, optimizer
  state keyed like ``torch.optim``), so it loads for single-process evaluation and generation, as
  ``init_from`` of the next stage, and resumes under any strategy; ``true`` writes a
  torch.distributed.checkpoint folder (one shard per rank, fast for very large models; turn it
  into one file with ``python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>``).

Generation under FSDP (sampling at validation, PPO rollouts) must not all-gather every block for
every decoded token: wrap it in ``with gathered_for_generation(model):`` (one all-gather per
block for the whole rollout, like FSDP1's ``summon_full_params``).

Processes and outputs. Lightning re-launches ``train.py`` for local ranks 1..N-1; lmforge's
launcher (`HydraJobLauncher`) gives them the exact overrides and run folder of *this* Hydra job,
so all ranks share one run folder and ``-m`` sweeps work (each job launches its ranks, then tears
its process group down for the next job). Children write no Hydra config or log file. Ranks
started outside Lightning (torchrun, srun) must agree on the run folder: every distributed run
checks this at start-up and names the fix (pass ``hydra.run.dir``) when they do not.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp", "fsdp")
SHARDINGS = ("full", "grad_op", "hybrid")
MIXED_PRECISION = ("auto", "bf16", "none")


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | fsdp
    # -- ddp ----------------------------------------------------------------------------------
    # None: on under automatic optimization, off for manual optimization (RL stages).
    static_graph: Optional[bool] = None
    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    # -- fsdp ---------------------------------------------------------------------------------
    sharding: str = "full"  # full | grad_op | hybrid (shard within a node, replicate across nodes)
    mixed_precision: str = "auto"  # auto (bf16 params/fp32 reduce under bf16-mixed on GPU) | bf16 | none
    cpu_offload: bool = False
    # False: one consolidated checkpoint file written by rank zero; True: a sharded folder.
    save_distributed_checkpoint: bool = False
    # -- all ------------------------------------------------------------------------------------
    activation_checkpointing: bool = False
    process_group_backend: Optional[str] = None  # None: nccl on GPUs, gloo on CPUs
    timeout_minutes: int = 30  # collectives that wait longer than this fail instead of hanging


class StrategyError(ValueError):
    """A strategy setting that cannot work, with the key to change."""


def validate_strategy(cfg: StrategyConfig) -> None:
    if cfg.name not in STRATEGIES:
        raise StrategyError(f"strategy={cfg.name!r}: unknown strategy; use one of {STRATEGIES}")
    if cfg.sharding not in SHARDINGS:
        raise StrategyError(f"strategy.sharding={cfg.sharding!r}: use one of {SHARDINGS}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise StrategyError(f"strategy.mixed_precision={cfg.mixed_precision!r}: use one of {MIXED_PRECISION}")
    if cfg.timeout_minutes <= 0:
        raise StrategyError(f"strategy.timeout_minutes={cfg.timeout_minutes} must be positive")


def build_strategy(cfg: StrategyConfig):
    """The Lightning strategy of the `strategy` config group."""
    validate_strategy(cfg)
    timeout = timedelta(minutes=cfg.timeout_minutes)
    if cfg.name == "single":
        return "auto"
    if cfg.name == "ddp":
        return LmforgeDDPStrategy(
            cfg,
            find_unused_parameters=cfg.find_unused_parameters,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            process_group_backend=cfg.process_group_backend,
            timeout=timeout,
        )
    return LmforgeFSDPStrategy(cfg, timeout=timeout)


# ============================================================================ processes and Hydra


def _hydra_job() -> Any | None:
    """The running Hydra job's config (hydra.*), or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides of the parent a child must not repeat: it runs one job, in the parent's folder.
_NOT_FOR_CHILDREN = ("hydra.run", "hydra.sweep", "hydra.mode", "hydra.launcher", "hydra/launcher",
                     "hydra.sweeper", "hydra/sweeper", "hydra.output_subdir", "hydra.job.name",
                     "hydra.job_logging", "hydra/job_logging", "hydra.job.num", "hydra.job.id")


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher (local ranks 1..N-1 re-run the entry script), made exact for
    Hydra: a child re-runs *this job* -- its resolved overrides (the one point of a ``-m`` sweep,
    not the whole sweep) in its run folder -- and writes no ``.hydra/`` config or log file.

    Lightning's own launcher re-passes ``sys.argv``: under ``-m`` every child would start the
    whole sweep and scatter outputs over several sweep folders."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_env: dict[str, str | None] | None = None

    def _call_children_scripts(self) -> None:
        hydra = _hydra_job()
        if hydra is None:
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        self.saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        from hydra.utils import get_original_cwd, to_absolute_path

        script = [sys.executable, to_absolute_path(sys.argv[0])]
        import __main__

        if getattr(__main__, "__spec__", None) is not None:
            script = [sys.executable, "-m", __main__.__spec__.name]
        run_dir = str(Path(hydra.runtime.output_dir).resolve())
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command = [
                *script,
                *hydra.overrides.task,
                *[o for o in hydra.overrides.hydra if not o.lstrip("+~").startswith(_NOT_FOR_CHILDREN)],
                f'hydra.run.dir="{run_dir}"',
                f"hydra.job.name={hydra.job.name}_rank{local_rank}",
                "hydra.output_subdir=null",
                "hydra/job_logging=stdout",
            ]
            self.procs.append(subprocess.Popen(command, env=env, cwd=get_original_cwd()))

    def restore_env(self) -> None:
        if self.saved_env is None:
            return
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.saved_env = None


def _is_multirun() -> bool:
    hydra = _hydra_job()
    if hydra is None:
        return False
    from hydra.types import RunMode

    return hydra.mode == RunMode.MULTIRUN


class _LmforgeParallel:
    """What the ddp and fsdp strategies share: the launcher, the run-folder agreement check,
    and the clean-up that lets the next job of a ``-m`` sweep start its own process group."""

    lmforge_cfg: StrategyConfig

    def _configure_launcher(self) -> None:
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def _check_same_run_dir(self, trainer) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        mine = str(Path(getattr(trainer, "lmforge_run_dir", trainer.default_root_dir)).resolve())
        everyone: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            shown = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(everyone))
            raise RuntimeError(
                "the ranks of this job resolved different run folders:\n" + shown + "\n"
                "Ranks started outside Lightning (torchrun, srun, one command per node) each compose the "
                "config, and a run folder built from the time differs between them: pass the same "
                "hydra.run.dir=<folder> to every rank (scripts/torchrun_two_nodes.sh and "
                "scripts/slurm/train.sbatch do)."
            )

    def _lmforge_teardown(self) -> None:
        launcher = self._launcher
        if isinstance(launcher, HydraJobLauncher) and launcher.saved_env is not None and _is_multirun():
            # The next job of the sweep runs in this process: it must launch its own ranks, on a
            # fresh port, into a fresh process group.
            import torch.distributed as dist

            for proc in launcher.procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            launcher.restore_env()


class LmforgeDDPStrategy(_LmforgeParallel, DDPStrategy):
    def __init__(self, cfg: StrategyConfig, **kwargs):
        super().__init__(**kwargs)
        self.lmforge_cfg = cfg

    def setup(self, trainer) -> None:
        self._check_same_run_dir(trainer)
        super().setup(trainer)

    def configure_ddp(self) -> None:
        static = self.lmforge_cfg.static_graph
        module = self.lightning_module
        accumulating = module.trainer.accumulate_grad_batches > 1
        if static is None:
            # Static graph assumes the same parameters take part in every backward, once per
            # forward, each followed by a gradient sync: true of the supervised stages without
            # gradient accumulation; not under accumulation (Lightning skips the sync of the
            # first micro-batches with no_sync, which trips DDP's static-graph reducer), nor for
            # the manual-optimization RL stages.
            static = bool(module.automatic_optimization) and not accumulating
        elif static and accumulating:
            raise StrategyError(
                "strategy.static_graph=true does not work with gradient accumulation "
                f"(trainer.accumulate_grad_batches={module.trainer.accumulate_grad_batches}): DDP's static-graph "
                "reducer fails on the micro-batches Lightning runs under no_sync. Use strategy.static_graph=null"
            )
        self._ddp_kwargs["static_graph"] = static
        super().configure_ddp()

    def teardown(self) -> None:
        super().teardown()
        self._lmforge_teardown()


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
                self.model, optimizer, optim_state_dict=native_to_fqn_optim_state(native, optimizer, self.model),
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


# ============================================================================ applying the strategy


def _trainer_of(module: L.LightningModule):
    return getattr(module, "_trainer", None)


def configure_for_strategy(module: L.LightningModule) -> None:
    """`StageModule.configure_model`: everything a stage's models need for the run's strategy.
    Idempotent (Lightning calls configure_model once per fit/validate/test)."""
    trainer = _trainer_of(module)
    if trainer is None:
        return
    strategy = trainer.strategy
    cfg: StrategyConfig = getattr(strategy, "lmforge_cfg", None) or _strategy_cfg_of(module)
    if cfg.name == "single" and trainer.world_size > 1:
        raise StrategyError(
            f"strategy=single runs one process, but this run has {trainer.world_size} "
            "(trainer.devices x trainer.num_nodes): use strategy=ddp or strategy=fsdp for several devices"
        )
    check_global_batch(module, trainer)
    if not any(isinstance(c, GlobalBatch) for c in trainer.callbacks):
        trainer.callbacks.append(GlobalBatch())
    if cfg.activation_checkpointing:
        for model in stage_models(module):
            checkpoint_blocks(model)
    if isinstance(strategy, LmforgeFSDPStrategy):
        shard_models(module, strategy.fsdp_mesh, cfg, precision=str(trainer.precision))


def _strategy_cfg_of(module) -> StrategyConfig:
    from omegaconf import OmegaConf

    cfg = getattr(module, "cfg", None)
    node = getattr(cfg, "strategy", None) if cfg is not None else None
    if node is None:
        return StrategyConfig()
    return node if isinstance(node, StrategyConfig) else StrategyConfig(**OmegaConf.to_container(node))


def stage_models(module: nn.Module) -> list[nn.Module]:
    """The CausalLM / ScalarModel instances registered on `module` (outermost only)."""
    from lmforge.model import CausalLM, ScalarModel

    found: list[nn.Module] = []
    for sub in module.modules():
        if isinstance(sub, (CausalLM, ScalarModel)) and not any(sub in set(m.modules()) for m in found):
            found.append(sub)
    return found


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each Transformer block in the backward pass instead of storing its activations.

    The block's `forward` is replaced on the instance (not wrapped in another module), so
    parameter names, state-dict keys and `model.backbone.blocks[i]` stay as they are. A
    deep copy (the PPO reference model) gets a forward bound to the copy."""
    for block in model.backbone.blocks:
        if getattr(block, "_lmforge_checkpointed", False):
            continue
        block.forward = types.MethodType(_checkpointed_block_forward, block)
        block._lmforge_checkpointed = True


def _checkpointed_block_forward(self, *args, **kwargs):
    forward = type(self).forward  # the class's (under FSDP2: a subclass of Block) forward
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)  # evaluation / generation: nothing to save


def fsdp_policies(cfg: StrategyConfig, precision: str, device_type: str) -> dict[str, Any]:
    """fully_shard keyword arguments of the configured mixed precision and offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if device_type == "cuda" and precision.startswith("bf16") else "none"
    kwargs: dict[str, Any] = {
        "mp_policy": (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if mp == "bf16" else MixedPrecisionPolicy()),
        "offload_policy": (CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
                           if cfg.cpu_offload else OffloadPolicy()),
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
    for name, child in module.named_children():
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
        saved.append((state, state._auto_reshard_after_forward,
                      [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
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


# ============================================================================ the global batch


def world_size_of(trainer_cfg) -> int:
    """The number of processes a run with this `trainer` config will have, before they start:
    WORLD_SIZE (torchrun, Lightning's children), SLURM_NTASKS under srun, else
    trainer.num_nodes x trainer.devices."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SLURM_NTASKS") and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(os.environ["SLURM_NTASKS"])
    devices = trainer_cfg.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        n = len(devices)
    else:  # "auto" / -1: every GPU of the node, or one CPU process
        gpu = trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else 1
    return n * int(trainer_cfg.num_nodes)


def accumulation_for(global_batch_size: int | None, micro_batch: int, world_size: int, accumulate: int = 1) -> int:
    """Gradient-accumulation steps that keep `global_batch_size` samples per optimizer step on
    `world_size` ranks of `micro_batch` samples each; `accumulate` when no global size is set."""
    if global_batch_size is None:
        return accumulate
    per_pass = micro_batch * world_size
    if global_batch_size <= 0 or global_batch_size % per_pass:
        raise StrategyError(
            f"algo.global_batch_size={global_batch_size} is not a multiple of algo.batch_size x world size "
            f"= {micro_batch} x {world_size} = {per_pass}: pick a global batch that {per_pass} divides, or change "
            f"algo.batch_size (the micro-batch per device) so that it divides {global_batch_size} / {world_size}"
        )
    if accumulate not in (1, global_batch_size // per_pass):
        raise StrategyError(
            f"trainer.accumulate_grad_batches={accumulate} contradicts algo.global_batch_size={global_batch_size} "
            f"(which needs {global_batch_size // per_pass} on {world_size} ranks of {micro_batch}): set only one"
        )
    return global_batch_size // per_pass


def global_batch(module: L.LightningModule, trainer) -> int | None:
    """Samples per optimizer step over all ranks: micro-batch x accumulation x world size
    (a module may define `global_batch_size()` when its batches mean something else)."""
    own = getattr(module, "global_batch_size", None)
    if callable(own):
        return own()
    algo = getattr(getattr(module, "cfg", None), "algo", None)
    micro = getattr(algo, "batch_size", None) if algo is not None else None
    if micro is None:
        return None
    return int(micro) * int(trainer.accumulate_grad_batches) * int(trainer.world_size)


def check_global_batch(module: L.LightningModule, trainer) -> None:
    algo = getattr(getattr(module, "cfg", None), "algo", None)
    wanted = algo.get("global_batch_size") if hasattr(algo, "get") else None
    actual = global_batch(module, trainer)
    if wanted is not None and actual is not None and wanted != actual:
        raise StrategyError(
            f"algo.global_batch_size={wanted} but this run steps on {actual} samples (algo.batch_size="
            f"{algo.batch_size} x accumulation {trainer.accumulate_grad_batches} x {trainer.world_size} ranks): "
            "the accumulation must be derived from it (lmforge.training.strategy.accumulation_for)"
        )


class GlobalBatch(L.Callback):
    """Logs `train/global_batch` (samples per optimizer step, all ranks together) and
    `train/world_size`, so curves of runs on different numbers of devices can be compared."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.value = global_batch(pl_module, trainer)
        if self.value is not None:
            log.info(
                f"global batch: {self.value} samples per optimizer step "
                f"({trainer.world_size} ranks x accumulation {trainer.accumulate_grad_batches})"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(self, "value", None) is not None:
            pl_module.log("train/global_batch", float(self.value), on_step=True, on_epoch=False)
            pl_module.log("train/world_size", float(trainer.world_size), on_step=True, on_epoch=False)


# ============================================================================ rank zero before start-up


def env_rank_is_zero() -> bool:
    """Whether this process will be global rank zero, from the launcher's environment alone
    (before the process group exists): RANK (torchrun), SLURM_PROCID (srun), LOCAL_RANK and
    NODE_RANK (Lightning's children, one command per node)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(key)
        if value not in (None, "") and int(value) != 0:
            return False
    return True


def nonzero_rank_hydra_overrides() -> list[str]:
    """Hydra overrides for a process that is not rank zero (see train.py): no `.hydra/` config
    copy and no log file in the shared run folder; the console only."""
    if env_rank_is_zero():
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
