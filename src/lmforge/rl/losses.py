"""Policy, value and reward-model losses.

Token-level tensors are (B, T) over response tokens with ``mask`` 1 up to and
including the first EOS. Token losses are masked means so padding never counts.
Advantages and old log-probs are detached here: they are constants of the
surrogate objective, and a stray graph would both bias the gradient and keep
rollout activations alive. Stats are detached scalars, ready to log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kl import kl_k3
from .stats import masked_mean


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, T) log-probability of ``tokens`` (B, T) under ``logits`` (B, T, V).

    Alignment: ``logits[:, t]`` must be the prediction *for* ``tokens[:, t]``.
    A causal LM's output at position p predicts token p+1, so for a response
    starting at position P of ``input_ids`` pass ``logits[:, P-1:-1]`` and
    ``input_ids[:, P:]``.

    ``temperature`` must equal the sampling temperature: the samples came from
    ``softmax(logits / temperature)``, and scoring them under other logits makes
    the KL and importance ratios wrong from step one (Huang et al., 2023).
    Computed in float32 because bf16 log-softmax over a large vocabulary is too
    coarse for ratios ``exp(logp - old_logp)`` near 1.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    # gather - logsumexp avoids materialising a second (B, T, V) log-softmax.
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens of the entropy of ``softmax(logits)`` (B, T, V)."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    # H = logsumexp(z) - sum p z; -inf logits (banned tokens) have p = 0 and
    # would give 0 * -inf = nan, in the value and in the gradient.
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    entropy = torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)
    return masked_mean(entropy, mask)


def _per_token(adv: Tensor, like: Tensor) -> Tensor:
    # Sequence-level advantages (B,) apply to every token of their sequence.
    adv = adv.detach()
    return adv.unsqueeze(-1) if adv.dim() == like.dim() - 1 else adv


def _clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss ``max(-A r, -A clip(r))`` and where the clipped branch wins."""
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # The max is the pessimistic bound: once a token's ratio has moved past the
    # clip in the direction the advantage favours, it stops receiving gradient.
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al., 2017) as a masked token mean.

    ``advantages`` is (B, T) or (B,). Stats: ``clip_frac`` (share of real tokens
    where the clipped branch is active) and ``approx_kl`` (masked mean of
    ``0.5 * (logp - old_logp)**2``, the k2 estimator used in Huang et al., 2023).
    """
    loss_t, clipped = _clipped_surrogate(logp, old_logp, _per_token(advantages, logp), clip_eps)
    loss = masked_mean(loss_t, mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (clip(v, old +- eps) - R)^2))``.

    Value clipping keeps the critic near the values that produced the
    advantages (Huang et al., 2023, following openai/lm-human-preferences).
    ``clip_eps=None`` disables it. Stats: ``vf_clip_frac``, the share of real
    tokens where the clipped error is the larger one.
    """
    old_values, returns = old_values.detach(), returns.detach()
    err = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(err, mask), {"vf_clip_frac": torch.zeros((), device=values.device)}
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


def policy_gradient_loss(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE / RLOO loss ``-masked_mean(A * logp)``; ``advantages`` (B,) or (B, T)."""
    return -masked_mean(_per_token(advantages, logp) * logp, mask)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO objective (Shao et al., 2024, DeepSeekMath), negated to a loss.

    Per token: clipped surrogate with the sequence's advantage (B,) plus
    ``kl_coef * k3(logp, ref_logp)``; the KL is a loss term rather than a reward
    penalty, so it does not enter the advantages. Aggregation as in the paper:
    mean over each sequence's real tokens, then mean over sequences (each
    sequence weighs the same regardless of its length).

    Stats: ``kl`` (k3 to the reference, same aggregation), ``clip_frac`` and
    ``approx_kl`` (token masked means, as in :func:`ppo_policy_loss`).
    """
    pg_t, clipped = _clipped_surrogate(logp, old_logp, _per_token(advantages, logp), clip_eps)
    kl_t = kl_k3(logp, ref_logp.detach())
    per_seq = masked_mean(pg_t + kl_coef * kl_t, mask, dim=-1)
    loss = per_seq.mean()
    with torch.no_grad():
        stats = {
            "kl": masked_mean(kl_t, mask, dim=-1).mean(),
            "clip_frac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
        }
    return loss, stats


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: float | Tensor | None = None, center_coef: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss ``-mean(log sigmoid(r_c - r_r - margin))``.

    ``logsigmoid`` instead of ``log(sigmoid())``: the latter underflows to
    -inf for confidently wrong pairs. ``margin`` (scalar or (B,)) demands a
    minimum gap (Llama 2). ``center_coef * mean((r_c + r_r)^2)`` pulls rewards
    towards zero mean, the auxiliary loss of Eisenstein et al. (2023), since
    the pairwise loss alone leaves the reward offset undetermined.

    Stats: ``accuracy`` (share with r_c > r_r; ties count as wrong),
    ``margin_mean`` (mean of r_c - r_r), ``reward_mean`` / ``reward_std``
    (population std) over all 2B rewards.
    """
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([r_chosen.reshape(-1), r_rejected.reshape(-1)]).float()
        stats = {
            "accuracy": (diff > 0).float().mean(),
            "margin_mean": diff.float().mean(),
            "reward_mean": both.mean(),
            "reward_std": both.std(unbiased=False),
        }
    return loss, stats
