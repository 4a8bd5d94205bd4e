"""Hardware and loop settings (conf/trainer, conf/strategy) -> a configured lightning.Trainer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from lmforge.perf import Throughput


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, "auto", or a list of device ids
    num_nodes: int = 1
    # "auto": bf16-mixed on a GPU that supports it, 32-true elsewhere.
    precision: str = "auto"
    max_steps: int = 300
    # Validate (and checkpoint) every this many optimizer steps.
    eval_every: int = 100
    log_every: int = 10
    accumulate_grad_batches: int = 1
    progress_bar: str = "auto"  # auto (rich on a terminal, plain lines otherwise) | rich | plain | none
    deterministic: bool = False


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | fsdp


def resolve_precision(cfg: TrainerConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class PlainProgress(TQDMProgressBar):
    """Not a terminal (CI, a log file): one line every `log_every` steps, no carriage returns."""

    def __init__(self, every: int):
        super().__init__(refresh_rate=0)
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.every == 0 and step != getattr(self, "_last", -1):
            self._last = step
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            shown = " ".join(f"{k}={v}" for k, v in metrics.items())
            print(f"step {step}/{trainer.max_steps} {shown}", flush=True)


def progress_callback(cfg: TrainerConfig):
    mode = cfg.progress_bar
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    if mode == "rich":
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar()
    if mode == "plain":
        return PlainProgress(cfg.log_every)
    return None


def build_trainer(cfg, run_dir: Path, loggers: list, module: L.LightningModule,
                  extra_callbacks: list | None = None) -> L.Trainer:
    """A Trainer for `module`: its `checkpoint_monitor` (metric, mode) picks the best checkpoint;
    gradient clipping is Lightning's under automatic optimization, the module's own otherwise."""
    from lmforge.strategy import build_strategy

    t: TrainerConfig = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    monitor, mode = getattr(module, "checkpoint_monitor", ("val/loss", "min"))
    clip = cfg.algo.optim.grad_clip if module.automatic_optimization else 0.0
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode,
                        save_top_k=1, save_last=True, auto_insert_metric_name=False),
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
        precision=resolve_precision(t),
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
    )
    trainer.lmforge_run_dir = run_dir
    return trainer
