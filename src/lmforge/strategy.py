"""The `strategy` config group -> a Lightning strategy."""

from __future__ import annotations

from lmforge.trainer import StrategyConfig


def build_strategy(cfg: StrategyConfig):
    if cfg.name == "single":
        return "auto"
    raise ValueError(f"strategy.name={cfg.name!r}: unknown strategy; use single")
