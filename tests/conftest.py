"""Shared fixtures: composing real configs from conf/ the way train.py does, at tiny sizes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lmforge.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Never touch the network or a real W&B account from tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

register_configs()


# Tests pin the precision: `auto` is bf16-mixed on a CPU with native bf16 and fp32 on one without,
# so a suite left to it tests different things on different machines (tests/training/test_precision.py runs
# both on purpose). A config that sets its own precision (trainer=gpu, an explicit override) keeps it.
PINNED_PRECISION = "32-true"


def pinned(overrides: list[str]) -> list[str]:
    """A train.py command line's overrides, plus the pinned precision unless they choose one
    (trainer.precision=..., or a trainer config other than the default)."""
    chosen = any(o.lstrip("+~").startswith(("trainer.precision=", "trainer=")) for o in overrides)
    return list(overrides) + ([] if chosen else [f"trainer.precision={PINNED_PRECISION}"])


def train_py_cmd(*overrides: str) -> list[str]:
    """The command line of `python train.py <overrides>` as the tests launch it (precision pinned)."""
    return [sys.executable, str(ROOT / "train.py"), *pinned(list(overrides))]


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None):
    """The config `python train.py <overrides>` would run, with the hydra: resolvers working."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []), return_hydra_config=True)
    if cfg.trainer.precision == "auto":
        cfg.trainer.precision = PINNED_PRECISION
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, cache: Path | None = None):
        cfg = compose_config(list(overrides), run_dir=tmp_path / "run")
        with open_dict(cfg):
            cfg.data.cache_dir = str(cache or tmp_path / "cache")
        return cfg

    return make


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer/token-file cache for the session: stages that only read data reuse it."""
    return tmp_path_factory.mktemp("lmforge-cache")
