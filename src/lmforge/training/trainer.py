"""Hardware and loop settings (conf/trainer, conf/strategy) -> a configured lightning.Trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmforge.training.distributed import StrategyConfig  # noqa: F401  (the `strategy` group's schema lives with the strategies)
from lmforge.training.precision import mixed_precision_plugin, normalize_precision
from lmforge.training.progress import PlainProgress, progress_callback  # noqa: F401  (the progress display, trainer.progress_bar)
from lmforge.training.throughput import Throughput, cpu_has_fast_bf16


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, "auto", or a list of device ids
    num_nodes: int = 1
    # "auto": bf16-mixed on a GPU that supports it and on a CPU with native bf16 (measured at
    # start-up: AVX512-BF16 / AMX), 32-true elsewhere.
    precision: str = "auto"
    max_steps: int = 300
    # Validate and write checkpoints/last.ckpt every this many optimizer steps.
    eval_every: int = 100
    # Also write last.ckpt every this many minutes of training (null: only at eval_every).
    checkpoint_every_minutes: Optional[float] = None
    # Also keep each periodic checkpoint as checkpoints/step-NNNNNNN.ckpt, the newest k of them (0: none).
    keep_last: int = 0
    # Stop after this many optimizer steps in a row with a non-finite loss or gradients (each is skipped).
    max_bad_steps: int = 5
    # Before training: refuse a run folder without room for the checkpoints (params x 12 bytes each).
    check_disk_space: bool = True
    log_every: int = 10
    accumulate_grad_batches: int = 1
    progress_bar: str = "auto"  # auto (rich on a terminal, plain lines otherwise) | rich | plain | none
    deterministic: bool = False


def resolve_precision(cfg: TrainerConfig) -> str:
    precision = normalize_precision(cfg.precision)
    if precision != "auto":
        return precision
    gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if not gpu and cfg.accelerator in ("auto", "cpu") and cpu_has_fast_bf16():
        return "bf16-mixed"  # a CPU with native bf16 (AVX512-BF16, AMX): about 2x the fp32 step
    return "32-true"


def checkpoint_plugins() -> list:
    """Atomic, weights_only checkpoint I/O; under SLURM, SIGUSR1 saves and requeues the job."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lmforge.training.checkpoint_io import AtomicCheckpointIO

    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        import signal

        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    return plugins


def build_trainer(
    cfg, run_dir: Path, loggers: list, module: L.LightningModule, extra_callbacks: list | None = None
) -> L.Trainer:
    """A Trainer for `module`: its `checkpoint_monitor` (metric, mode) picks the best checkpoint;
    gradient clipping is Lightning's under automatic optimization, the module's own otherwise."""
    from lmforge.training.fault import NonFiniteGuard, PeriodicCheckpoint, RNGState
    from lmforge.training.strategy import build_strategy

    t: TrainerConfig = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    monitor, mode = getattr(module, "checkpoint_monitor", ("val/loss", "min"))
    clip = cfg.algo.optim.grad_clip if module.automatic_optimization else 0.0
    precision = resolve_precision(t)
    # *-mixed: our plugin, which clips gradients under fused AdamW too (lmforge/training/precision.py).
    mixed = mixed_precision_plugin(precision, t.accelerator, cfg.strategy.name)
    callbacks = [
        # best.ckpt; last.ckpt is PeriodicCheckpoint's (written at every validation, not only on improvement)
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=False,
            auto_insert_metric_name=False,
        ),
        PeriodicCheckpoint(ckpt_dir, every_minutes=t.checkpoint_every_minutes, keep_last=t.keep_last),
        RNGState(),
        NonFiniteGuard(max_bad_steps=t.max_bad_steps, checkpoint_dir=ckpt_dir),
        Throughput(every=t.log_every),
    ]
    bar = progress_callback(t)
    if bar is not None:
        callbacks.append(bar)
    callbacks += extra_callbacks or []
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=None if mixed else precision,
        strategy=build_strategy(cfg.strategy),
        max_steps=t.max_steps,
        val_check_interval=t.eval_every * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=clip or None,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=bar is not None,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        num_sanity_val_steps=0,
        plugins=checkpoint_plugins() + ([mixed] if mixed else []),
    )
    trainer.lmforge_run_dir = run_dir
    return trainer
