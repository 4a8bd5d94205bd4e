"""Heads on the shared Transformer backbone.

* CausalLM: next-token logits (pretraining, SFT, the PPO policy and its reference);
* ScalarModel: one scalar per position (the reward model reads it at the last real token,
  the PPO critic uses every position as a value estimate).

State-dict keys are stable on purpose -- later stages copy `backbone.*` between models:
`backbone.*`, `lm_head.weight` (untied CausalLM only), `head.weight`, `head.bias`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.model.lm_loss import lm_loss_sum
from lmforge.model.transformer import ModelConfig, Transformer


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        # Tied: the output projection reuses the token embedding (one vocab x d_model matrix).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.backbone.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        idx: Tensor,
        *,
        last_only: bool = False,
        columns: slice | None = None,
        return_hidden: bool = False,
        targets: Tensor | None = None,
        loss_chunk: int = 256,
        **backbone_kwargs,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """idx (B, T) -> logits (B, T, vocab_size) in the compute dtype.

        last_only: logits of the last position only, (B, 1, vocab_size) -- generation needs
        nothing else, and a (B, T, vocab) prefill is often the largest tensor of a rollout.
        columns: logits of these positions only (RL scores just the response's).
        return_hidden: also the hidden states the logits came from, (logits, hidden) -- for a value
        head on the policy. Callers go through this forward, never `backbone` directly: under FSDP
        the root module's hooks gather the embedding and the head.
        targets: (B, T) next-token ids (IGNORE_INDEX = -100 where no loss): instead of logits,
        return the summed fp32 cross-entropy over the real targets, computed `loss_chunk` rows at
        a time without materializing the logits (lm_loss.py; loss_chunk=0: the plain path).
        backbone_kwargs: attention_mask, positions, kv_cache (see Transformer.forward)."""
        hidden = self.backbone(idx, **backbone_kwargs)
        if targets is not None:
            return lm_loss_sum(hidden, self.lm_head_weight, targets, loss_chunk)
        if last_only:
            hidden = hidden[:, -1:]
        elif columns is not None:
            hidden = hidden[:, columns]
        logits = F.linear(hidden, self.lm_head_weight)
        return (logits, hidden) if return_hidden else logits

    def num_params(self) -> int:
        """Unique parameters: a tied embedding counts once."""
        return sum(p.numel() for p in self.parameters())


class ScalarModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        self.head = nn.Linear(cfg.d_model, 1)
        # The final norm makes hidden states ~unit RMS per channel, so std 1/sqrt(d_model + 1)
        # starts the scalar at std ~1 whatever the width (OpenAI lm-human-preferences).
        nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None, **backbone_kwargs) -> Tensor:
        """idx (B, T) -> one scalar per position (B, T). Pass the attention_mask of a padded
        batch, then read the reward with gather_last(values, attention_mask)."""
        hidden = self.backbone(idx, attention_mask=attention_mask, **backbone_kwargs)
        return self.head(hidden).squeeze(-1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) mask (1 = real) -> (B,) long column of each row's last real token. Correct for
    left and right padding alike; a row without any real token gets 0."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (columns * attention_mask.long()).max(dim=1).values


def gather_last(values: Tensor, attention_mask: Tensor) -> Tensor:
    """values (B, T) -> (B,) the value at each row's last real token."""
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
