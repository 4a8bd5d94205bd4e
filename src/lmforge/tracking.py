"""Loggers (conf/logger/*.yaml) and text samples, rank zero only.

`logger=wandb` goes offline by itself when no W&B credentials are configured, and prints the
`wandb sync` command to upload later; it never prompts for a login.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    project: str = "lmforge"
    entity: Optional[str] = None
    # "auto": online when credentials exist (WANDB_API_KEY or a netrc entry), else offline.
    mode: str = "auto"
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_model: bool = False


@dataclass
class CSVConfig:
    flush_logs_every_n_steps: int = 50


@dataclass
class TensorBoardConfig:
    pass


LOGGER_SCHEMAS = {"wandb": WandbConfig, "csv": CSVConfig, "tensorboard": TensorBoardConfig}


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(requested: str) -> str:
    env = os.environ.get("WANDB_MODE")
    if env:  # the user's environment wins (WANDB_MODE=disabled is respected)
        return env
    if requested != "auto":
        return requested
    return "online" if wandb_has_credentials() else "offline"


def build_loggers(logger_cfg, run_dir: Path, run_name: str) -> list[Logger]:
    loggers: list[Logger] = []
    if not logger_cfg:
        return loggers
    if "csv" in logger_cfg:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version="",
                                 flush_logs_every_n_steps=logger_cfg.csv.flush_logs_every_n_steps))
    if "tensorboard" in logger_cfg:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if "wandb" in logger_cfg:
        w = logger_cfg.wandb
        mode = wandb_mode(w.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                name=run_name,
                project=w.project,
                entity=w.entity,
                group=w.group,
                tags=list(w.tags),
                save_dir=str(run_dir),
                mode=mode,
                log_model=w.log_model,
            )
        )
        if mode == "offline":
            rank_zero_info(
                f"W&B is offline (no credentials). Upload later with: wandb sync {run_dir}/wandb/offline-run-*"
            )
    return loggers


@rank_zero_only
def log_text_samples(trainer, key: str, rows: list[dict[str, Any]]) -> None:
    """Samples go to the console, to <run_dir>/samples.jsonl, and to W&B as a table."""
    if not rows:
        return
    for r in rows:
        rank_zero_info(f"[{key} @ step {r.get('step')}] {r.get('prompt', '')!r} -> {r.get('sample', '')!r}")
    run_dir = getattr(trainer, "lmforge_run_dir", None)
    if run_dir:
        with open(Path(run_dir) / f"{key}.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            cols = list(rows[0].keys())
            lg.log_text(key=key, columns=cols, data=[[r[c] for c in cols] for r in rows], step=trainer.global_step)
