"""The reward-model kind of reward source: a `reward` stage checkpoint (ScalarModel) read at the last
real token of prompt + response, normalized with the checkpoint's stored `reward_stats`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from lmforge.hf.importer import load_any_checkpoint
from lmforge.model import ScalarModel, gather_last
from lmforge.rewards.source import ScoringBatch
from lmforge.training.checkpoint import (
    CheckpointError,
    StageCheckpoint,
    load_matching,
    require_stage,
    submodule_state,
)


def _reward_stats(ckpt: StageCheckpoint) -> tuple[float, float]:
    stats = ckpt.meta.get("reward_stats") or {}
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{ckpt.path}: the reward checkpoint stores no reward_stats {{mean, std}} to normalize its "
            "rewards with; re-save it with a current reward stage, or set normalize: false on this "
            "reward source (raw rewards, whose scale the KL coefficient was not tuned for)"
        ) from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise CheckpointError(f"{ckpt.path}: reward_stats mean={mean}, std={std} cannot normalize (std must be > 0)")
    return mean, std


def load_reward_model(path: str | Path, what: str = "reward model") -> tuple[ScalarModel, StageCheckpoint]:
    """A frozen ScalarModel (eval mode, no dropout, no grad) from a `reward` stage checkpoint."""
    ckpt = load_any_checkpoint(path)
    require_stage(ckpt, ("reward",), what)
    model = ScalarModel(replace(ckpt.model_config, dropout=0.0))
    load_matching(model, submodule_state(ckpt.state_dict, "model"), f"{what}={path}")
    model.eval().requires_grad_(False)
    return model, ckpt


class RewardModelSource:
    """A reward model scoring prompt + response, optionally normalized by its reward_stats."""

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer=None,
        normalize: bool = True,
        name: str | None = None,
        micro_batch_size: int = 32,
    ):
        self.path = str(path)
        self.model, ckpt = load_reward_model(path, what=f"algo.reward ckpt {name or ''}".strip())
        self.tokenizer = ckpt.tokenizer
        self.mean, self.std = _reward_stats(ckpt) if normalize else (0.0, 1.0)
        self.normalize = normalize
        self.name = name or "rm"
        self.micro_batch_size = micro_batch_size
        # Same tokenizer as the policy: score the rollout's tokens as they are (no re-encoding);
        # otherwise re-encode the texts with the reward model's own tokenizer.
        self.reads_policy_tokens = tokenizer is not None and tokenizer.proto() == ckpt.tokenizer.proto()
        self.meta = ckpt.meta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> RewardModelSource:
        self.model.to(device)
        return self

    def _encode_texts(self, batch: ScoringBatch) -> tuple[Tensor, Tensor]:
        """Right-padded prompt + response + EOS with the reward model's tokenizer (cut from the
        left of the prompt when too long, as the reward stage encodes pairs)."""
        tok, limit = self.tokenizer, self.model.cfg.max_seq_len
        rows = []
        for p, r in zip(batch.prompts, batch.responses):
            resp = (tok.encode(r) + [tok.eos_id])[: limit - 1]
            rows.append((tok.encode(p) + resp)[-limit:])
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask

    @torch.no_grad()
    def raw_scores(self, batch: ScoringBatch) -> Tensor:
        if self.reads_policy_tokens and batch.sequences is not None:
            ids, mask = batch.sequences, batch.attention_mask
        else:
            ids, mask = self._encode_texts(batch)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = []
        for i in range(0, ids.shape[0], self.micro_batch_size):
            m = mask[i : i + self.micro_batch_size]
            values = self.model(ids[i : i + self.micro_batch_size], attention_mask=m)
            out.append(gather_last(values, m).float())
        return torch.cat(out)

    def __call__(self, batch: ScoringBatch) -> Tensor:
        return (self.raw_scores(batch) - self.mean) / self.std


def normalized_head(rm: RewardModelSource) -> tuple[Tensor, Tensor]:
    """The reward model's head with its normalization folded in: w / std, (b - mean) / std, so a
    critic initialized from it starts by predicting the normalized reward PPO optimizes."""
    head = rm.model.head
    return head.weight.detach() / rm.std, (head.bias.detach() - rm.mean) / rm.std
