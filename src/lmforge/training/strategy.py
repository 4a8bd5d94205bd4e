"""The `strategy` config group -> a Lightning strategy, and what every stage needs to run on many
processes: choosing the strategy (`build_strategy`), DDP, applying the strategy to a stage's
models (`configure_for_strategy`: activation checkpointing, FSDP sharding) and the global batch.
The config schema and the plumbing DDP and FSDP share (Hydra launcher, run-folder check, rank
zero before start-up) are in `lmforge.training.distributed`; everything FSDP2 (sharding, its
checkpoints, gathering for generation) in `lmforge.training.fsdp`.

Strategies (conf/strategy/*.yaml):

* ``single``: one process, one device (Lightning's "auto" with ``trainer.devices=1``).
* ``ddp``: DistributedDataParallel, one process per device. Gradients are all-reduced straight out
  of the buckets (``gradient_as_bucket_view``), ``find_unused_parameters`` is off (lmforge models
  use every parameter), and ``static_graph`` is on where it is safe: automatic optimization
  without gradient accumulation (DDP's static-graph reducer fails under the ``no_sync`` of
  accumulation micro-batches -- measured), off for the manual-optimization RL stages (several
  forwards/backwards of different sub-networks per step).
* ``fsdp``: fully sharded data parallelism -- parameters, gradients and optimizer state sharded
  across ranks (`lmforge.training.fsdp`).

``activation_checkpointing`` (any strategy): each block's activations are recomputed in the
backward pass (``torch.utils.checkpoint``, non-reentrant) instead of stored (`checkpoint_blocks`).
"""

from __future__ import annotations

import logging
import os
import types
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lmforge.training.distributed import (
    StrategyConfig,
    StrategyError,
    _LmforgeParallel,
    stage_models,
    validate_strategy,
)
from lmforge.training.fsdp import LmforgeFSDPStrategy, shard_models

log = logging.getLogger(__name__)


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
