"""Compose the parts a config names, build the Trainer, fit; rank-zero bookkeeping.

Data flows one way: conf -> run.main -> (datamodule, module, trainer) -> checkpoints in run_dir.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lmforge.algos import STAGES
from lmforge.config import validate
from lmforge.errors import ConfigError
from lmforge.training import console, tracking
from lmforge.training.checkpoint import (
    CheckpointError,
    StageCheckpoint,
    check_resume,
    load_checkpoint,
)
from lmforge.training.checkpoint_io import newest_valid_checkpoint, remove_stale_temporaries
from lmforge.training.fault import check_output_dir, estimate_checkpoint_bytes
from lmforge.training.trainer import build_trainer

log = logging.getLogger(__name__)


def run_name(cfg: DictConfig) -> str:
    return tracking.run_name(cfg)


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from: `resume` itself, or for resume=auto the newest valid one in
    the run folder (damaged ones are skipped with a message; leftovers of killed writes removed)."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return cfg.resume
    if rank_zero_only.rank == 0:
        for p in remove_stale_temporaries(run_dir / "checkpoints"):
            log.info(f"resume=auto: removed {p.name}, an unfinished checkpoint write of a killed run")
    info = newest_valid_checkpoint(run_dir)
    if info is not None:
        log.info(f"resume=auto: resuming from {info.path} (step {info.global_step})")
        return str(info.path)
    log.info(f"resume=auto: no valid checkpoint in {run_dir / 'checkpoints'}; starting fresh")
    return None


def prepare_resume(cfg: DictConfig, path: str) -> StageCheckpoint:
    """Refuse a checkpoint of another stage or model shape, warn when the data order would differ,
    and keep the LR schedule's horizon: without algo.optim.decay_steps it is trainer.max_steps,
    which a resumed run may have changed, so it is pinned to the checkpoint's run's."""
    ckpt = load_checkpoint(path, mmap=True)
    changed = check_resume(ckpt, cfg, OmegaConf.to_object(cfg.model))
    if changed:
        rank_zero_warn(
            f"resume={path}: settings that decide the data order differ from the checkpoint's run, so the "
            "resumed run will not read what the original would have:\n  " + "\n  ".join(changed)
        )
    optim = cfg.algo.get("optim")
    old = ckpt.meta.get("config") or {}
    if optim is not None and optim.get("decay_steps", None) is None:
        old_optim = (old.get("algo") or {}).get("optim") or {}
        horizon = old_optim.get("decay_steps") or (old.get("trainer") or {}).get("max_steps")
        if horizon and horizon != cfg.trainer.max_steps:
            optim.decay_steps = int(horizon)
            log.info(
                f"resume: keeping the checkpoint's LR schedule, which decays over {horizon} steps "
                f"(algo.optim.decay_steps={horizon}); set algo.optim.decay_steps to choose another horizon"
            )
    return ckpt


def _tokenizer_bytes(tok) -> bytes | None:
    proto = getattr(tok, "proto", None)
    return proto() if callable(proto) else None


def use_compile_cache(cfg: DictConfig) -> None:
    """With compile=true, keep torch.compile's generated code in cfg.compile_cache_dir (Inductor
    and Triton caches), so a second run with the same model and shapes starts without compiling.
    An environment variable the user set wins."""
    if cfg.compile and cfg.compile_cache_dir:
        cache = Path(cfg.compile_cache_dir).expanduser().resolve()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))


def main(cfg: DictConfig) -> dict:
    """Run one stage. Returns the final metrics and where the outputs are."""
    console.setup()
    OmegaConf.resolve(cfg)
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    check_output_dir(run_dir)
    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    resume_from = prepare_resume(cfg, ckpt_path) if ckpt_path else None
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    use_compile_cache(cfg)
    if cfg.algo.name not in STAGES:
        raise ConfigError(f"algo.name={cfg.algo.name!r}: no such stage; choose one of {sorted(STAGES)}")
    stage = importlib.import_module(STAGES[cfg.algo.name])
    module, datamodule = stage.build(cfg, run_dir)
    if resume_from is not None and _tokenizer_bytes(resume_from.tokenizer) != _tokenizer_bytes(module.tokenizer):
        raise CheckpointError(
            f"resume={ckpt_path} was trained with a different tokenizer than this run's data gives: resume "
            "with the data settings of the checkpoint's run"
        )
    del resume_from
    t = cfg.trainer
    if t.check_disk_space:
        kept = 2 + t.keep_last  # last.ckpt, best.ckpt, the step copies (hard links, counted to be safe)
        check_output_dir(run_dir, estimate_checkpoint_bytes(module), n_kept=kept)
    # The W&B run of a resumed checkpoint is read from it before any logger exists.
    loggers = tracking.build_loggers(cfg.logger, run_dir, run_name(cfg), cfg=cfg, resume_from=ckpt_path)
    trainer = build_trainer(cfg, run_dir, loggers, module, extra_callbacks=tracking.tracking_callbacks(cfg))
    status, result = "failed", None
    try:
        tracking.log_run_config(loggers, cfg, trainer)
        start = time.perf_counter()
        preempted = False
        try:
            with console.fit_warnings(resuming=ckpt_path is not None):
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            # Lightning stops at the end of the step that got SIGTERM; PeriodicCheckpoint saved it.
            preempted = True
        wall = time.perf_counter() - start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        result = {
            "run_dir": str(run_dir),
            "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
            "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
            "wall_s": round(wall, 1),
            "metrics": metrics,
            "preempted": preempted,
            "global_step": trainer.global_step,
        }
        status = "preempted" if preempted else "success"
    finally:
        # Every job of a -m sweep ends its W&B run here (the next job starts its own), even on errors.
        tracking.finish_loggers(loggers, status, result)
    if preempted:
        log.info(
            f"\nPreempted at step {trainer.global_step} after {wall:.0f}s. Run folder: {run_dir}\n"
            f"  checkpoint: {result['last_checkpoint']}\n"
            "  continue with the same command and resume=auto\n"
        )
        return result
    log.info(
        f"\nDone in {wall:.0f}s. Run folder: {run_dir}\n"
        f"  checkpoint: {result['last_checkpoint']}\n"
        + "".join(f"  {k}: {v:.4g}\n" for k, v in sorted(metrics.items()) if k.startswith("val/"))
    )
    return result
