"""Shared fixtures: composing real configs from conf/ the way train.py does, at tiny sizes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lmforge.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Never touch the network or a real W&B account from tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

register_configs()


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None):
    """The config `python train.py <overrides>` would run, with the hydra: resolvers working."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []), return_hydra_config=True)
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
