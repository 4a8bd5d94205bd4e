"""Rewards, returns and advantages for PPO, REINFORCE, RLOO and GRPO.

Token-level tensors are (B, T) over response tokens with ``mask`` 1 up to and
including the first EOS. Advantages are constants of the policy gradient, so
every estimator here works on detached inputs: a gradient leaking through a
baseline or a value target would silently bias the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kl import kl_estimate


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last real token of each row; 0 for an empty row."""
    m = mask.bool()
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).amax(-1).clamp_min(0)


def token_rewards(
    score: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kl_kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards for PPO: a KL penalty on every token, the score at the end.

    ``rewards[b, t] = -kl_coef * KL[b, t]`` on real tokens, plus ``score[b]``
    at the last real token of row ``b``; 0 after the end (Ziegler et al., 2019;
    "The N Implementation Details of RLHF with PPO", Huang et al., 2023). The
    penalty is per token so the critic can attribute it to the step that caused it.

    Returns ``(rewards, kl)``, both (B, T), with ``kl`` the masked per-token estimate.
    """
    m = mask.bool()
    kl = torch.where(m, kl_estimate(logp.detach(), ref_logp.detach(), kl_kind), 0.0)
    rewards = -kl_coef * kl
    # An empty response has nowhere to put its score; drop it rather than
    # crediting position 0, which is padding.
    end_score = torch.where(m.any(-1), score.detach().to(rewards.dtype), 0.0)
    rewards = rewards.scatter_add(-1, last_token_index(m)[:, None], end_score[:, None])
    return rewards, kl


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al., 2016), reverse in time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V`` and ``A`` taken as 0 after the last real token: the episode ends
    at EOS, so there is nothing to bootstrap from. ``gamma=1`` is the RLHF
    default (Huang et al., 2023) because the only large reward is at the end.

    Returns ``(advantages, returns)``, (B, T), ``returns = advantages + values``
    (the critic's target), both 0 on masked-out tokens. Whitening of the
    advantages is left to the caller (:func:`lmforge.rl.stats.masked_whiten`).
    """
    m = mask.bool()
    r = torch.where(m, rewards.detach(), 0.0)
    v = torch.where(m, values.detach(), 0.0)
    T = r.shape[-1]
    adv = torch.zeros_like(r)
    last_gae = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = r[:, t] + gamma * next_v - v[:, t]
        # Zeroing on padding makes last_gae 0 when we step onto the last real token.
        last_gae = torch.where(m[:, t], delta + gamma * lam * last_gae, 0.0)
        adv[:, t] = last_gae
    return adv, torch.where(m, adv + v, 0.0)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = sum_k gamma^k r_{t+k}`` over real tokens (REINFORCE).

    With a single terminal reward R at step L-1 this gives ``G_t = gamma^(L-1-t) R``:
    later tokens are credited more than early ones when gamma < 1. 0 on padding.
    """
    m = mask.bool()
    r = torch.where(m, rewards.detach(), 0.0)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[-1])):
        running = torch.where(m[:, t], r[:, t] + gamma * running, 0.0)
        out[:, t] = running
    return out


def _groups(scores: Tensor, k: int) -> Tensor:
    if k < 2:
        raise ValueError(f"group size k must be >= 2, got {k}")
    if scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"scores must be (n_prompts * k,), got shape {tuple(scores.shape)} for k={k}")
    # Consecutive samples share a prompt: scores = [p0s0, p0s1, ..., p1s0, ...].
    return scores.detach().view(-1, k)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al., 2019; Ahmadian et al., 2024).

    ``A_i = r_i - mean_{j != i} r_j`` within each group of ``k`` consecutive
    samples of the same prompt. Leaving ``i`` out keeps the baseline independent
    of the sample it scores, so the estimator stays unbiased. Returns (B,).
    """
    g = _groups(scores, k)
    baseline = (g.sum(-1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(scores: Tensor, k: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al., 2024, DeepSeekMath).

    ``A_i = (r_i - mean(group)) / (std(group) + eps)``. The paper does not say
    which std; we use the unbiased (Bessel-corrected) one with ``eps=1e-4``, as
    the reference GRPO implementation in TRL does. A group with identical
    scores gets advantage 0. ``scale=False`` drops the division, as advocated by
    Dr. GRPO (Liu et al., 2025) because it over-weights near-uniform groups.
    Returns (B,).
    """
    g = _groups(scores, k)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, unbiased=True, keepdim=True) + eps)
    return adv.reshape(-1)


class MovingAverageBaseline:
    """Exponential moving average of batch-mean rewards, a REINFORCE baseline.

    ``value <- momentum * value + (1 - momentum) * batch_mean``. The first update
    adopts the batch mean, so early advantages are not biased by a 0 start.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.value = 0.0
        self.n_updates = 0

    def update(self, batch_mean: float | Tensor) -> float:
        x = float(batch_mean)
        self.value = x if self.n_updates == 0 else self.momentum * self.value + (1.0 - self.momentum) * x
        self.n_updates += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.n_updates = int(state["n_updates"])
