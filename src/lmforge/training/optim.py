"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule.

Shared by every stage, so a stage's `configure_optimizers` is two lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    # The cosine decays to lr * min_lr_ratio at decay_steps (default: trainer.max_steps).
    min_lr_ratio: float = 0.1
    decay_steps: Optional[int] = None
    # Clip the global gradient norm to this (0 disables).
    grad_clip: float = 1.0
    # "auto": fused AdamW (foreach for FSDP-sharded parameters); "fused" | "foreach" | "loop".
    impl: str = "auto"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of Linear layers.

    Norm gains, biases and embeddings get no weight decay: shrinking a norm gain or an embedding
    row toward zero is not regularization, it distorts the representation (GPT-2/nanoGPT practice).
    Embedding weights are recognized by module type, so a tied LM head (the same tensor) is
    treated as an embedding.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.add(id(module.weight))
    decay, keep = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (keep if p.dim() < 2 or id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    impl = cfg.impl
    if impl == "auto":
        # Fused: one kernel per parameter tensor for the whole update, on CUDA and on CPUs too
        # (torch >= 2.4): 2-12% of a tiny model's CPU step over foreach (bench/README.md). FSDP's
        # sharded parameters (DTensors) keep foreach, which every torch version supports for them.
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        impl = "foreach" if sharded else "fused"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        **kwargs,
    )


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base LR at `step`: linear warmup from 1/warmup to 1, then cosine to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A LambdaLR stepped once per optimizer step (Lightning: interval='step')."""
    from functools import partial

    fn = partial(
        warmup_cosine,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        min_ratio=cfg.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
