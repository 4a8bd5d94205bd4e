"""Compose the parts a config names, build the Trainer, fit; rank-zero bookkeeping.

Data flows one way: conf -> run.main -> (datamodule, module, trainer) -> checkpoints in run_dir.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lmforge.algos import STAGES
from lmforge.config import ConfigError, validate
from lmforge.tracking import build_loggers
from lmforge.trainer import build_trainer

log = logging.getLogger(__name__)


def run_name(cfg: DictConfig) -> str:
    data = cfg.data.source
    return f"{cfg.algo.name}-{cfg.model_name}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return cfg.resume
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        rank_zero_info(f"resume=auto: resuming from {last}")
        return str(last)
    rank_zero_info(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'}; starting fresh")
    return None


def main(cfg: DictConfig) -> dict:
    """Run one stage. Returns the final metrics and where the outputs are."""
    OmegaConf.resolve(cfg)
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.algo.name not in STAGES:
        raise ConfigError(f"algo.name={cfg.algo.name!r}: no such stage; choose one of {sorted(STAGES)}")
    stage = importlib.import_module(STAGES[cfg.algo.name])
    module, datamodule = stage.build(cfg, run_dir)
    loggers = build_loggers(cfg.logger, run_dir, run_name(cfg))
    trainer = build_trainer(cfg, run_dir, loggers, module)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=find_resume_checkpoint(cfg, run_dir))
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = {
        "run_dir": str(run_dir),
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
        "wall_s": round(wall, 1),
        "metrics": metrics,
    }
    rank_zero_info(
        f"\nDone in {wall:.0f}s. Run folder: {run_dir}\n"
        f"  checkpoint: {result['last_checkpoint']}\n"
        + "".join(f"  {k}: {v:.4g}\n" for k, v in sorted(metrics.items()) if k.startswith("val/"))
    )
    return result
