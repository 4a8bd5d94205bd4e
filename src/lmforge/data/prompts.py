"""Prompts for text samples during training and for evaluation."""

from __future__ import annotations

from lmforge.data.config import DataConfig


def sample_prompts(cfg: DataConfig, n: int) -> list[str]:
    """A few held-out prompts of the source; "" (start of a new document) where it has none."""
    if n <= 0:
        return []
    if cfg.source == "synthetic":
        from lmforge.world.generator import SyntheticWorld

        return SyntheticWorld(cfg.seed).prompts(n, split="val")
    return [""] * n
