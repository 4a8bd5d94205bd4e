"""Policy, value and reward-model losses.

Token-level tensors are (B, T) over response tokens with ``mask`` 1 up to and
including the first EOS. Padding never counts. Advantages and old log-probs are
detached here: they are constants of the surrogate objective, and a stray graph
would both bias the gradient and keep rollout activations alive. Stats are
detached scalars, ready to log.

Aggregation (``agg``, the ``algo.loss_agg`` setting) turns per-token losses into
one number, see :func:`aggregate`:

* ``token-mean``: every real token of the update weighs the same;
* ``seq-mean-token-mean``: mean over each sequence's tokens, then over sequences
  (DeepSeekMath's GRPO: a short response's tokens weigh more);
* ``seq-mean-token-sum-norm``: each sequence's token SUM divided by a constant
  (e.g. max_new_tokens), then mean over sequences (Dr. GRPO, Liu et al., 2025:
  no length bias).

``norm`` (:class:`LossNorm`) carries the denominators of the WHOLE optimizer
update: its real-token and sequence counts over all micro-batches (and, per rank,
the global count divided by the number of ranks, since DDP averages gradients).
A micro-batch's loss is then its share of the update's loss, and summing the
micro-batches' gradients gives the same gradient whatever the micro-batch split
or the number of ranks. Without ``norm`` the denominators are the batch's own
(the batch is the whole update). Stats use the same denominators, so they too
add up over micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .kl import kl_estimate
from .stats import masked_mean

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNorm:
    """Denominators of one optimizer update (see the module docstring).

    ``n_tokens`` / ``n_seqs``: real response tokens / sequences of the whole
    update (all micro-batches; under DDP the all-ranks count divided by the
    number of ranks). ``const``: the divisor of ``seq-mean-token-sum-norm``.
    ``None`` = the count of the batch at hand.
    """

    n_tokens: float | Tensor | None = None
    n_seqs: float | Tensor | None = None
    const: float | None = None


def _masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # where, not x * mask: padding may hold inf/nan.
    xs = torch.where(mask.bool(), x.float(), 0.0)
    return xs.sum() if dim is None else xs.sum(dim)


def token_mean(x: Tensor, mask: Tensor, n_tokens: float | Tensor | None = None) -> Tensor:
    """``sum(x over real tokens) / n_tokens`` (default: this batch's real-token count)."""
    n = mask.bool().sum().float() if n_tokens is None else torch.as_tensor(n_tokens, dtype=torch.float32)
    return _masked_sum(x, mask) / n.clamp_min(1.0)


def seq_mean_token_mean(x: Tensor, mask: Tensor, n_seqs: float | Tensor | None = None) -> Tensor:
    """Mean over each row's real tokens, summed over rows, ``/ n_seqs`` (default: B)."""
    n = float(x.shape[0]) if n_seqs is None else n_seqs
    per_seq = _masked_sum(x, mask, -1) / mask.bool().sum(-1).float().clamp_min(1.0)
    return per_seq.sum() / torch.as_tensor(n, dtype=torch.float32).clamp_min(1.0)


def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, const: float, n_seqs: float | Tensor | None = None) -> Tensor:
    """Each row's token sum ``/ const``, summed over rows, ``/ n_seqs`` (default: B)."""
    if not const or const <= 0:
        raise ValueError(f"seq-mean-token-sum-norm needs a positive constant, got {const}")
    n = float(x.shape[0]) if n_seqs is None else n_seqs
    return _masked_sum(x, mask) / const / torch.as_tensor(n, dtype=torch.float32).clamp_min(1.0)


def aggregate(x: Tensor, mask: Tensor, agg: str = "token-mean", norm: LossNorm | None = None) -> Tensor:
    """Per-token ``x`` (B, T) -> scalar by ``agg`` (one of LOSS_AGGS) with ``norm``'s denominators."""
    norm = norm or LossNorm()
    if agg == "token-mean":
        return token_mean(x, mask, norm.n_tokens)
    if agg == "seq-mean-token-mean":
        return seq_mean_token_mean(x, mask, norm.n_seqs)
    if agg == "seq-mean-token-sum-norm":
        return seq_mean_token_sum_norm(x, mask, norm.const, norm.n_seqs)
    raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGS}")


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


def token_entropy(logits: Tensor) -> Tensor:
    """(B, T) entropy of ``softmax(logits)`` (B, T, V) at every position."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    # H = logsumexp(z) - sum p z; -inf logits (banned tokens) have p = 0 and
    # would give 0 * -inf = nan, in the value and in the gradient.
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens of the entropy of ``softmax(logits)`` (B, T, V)."""
    return masked_mean(token_entropy(logits), mask)


def _per_token(adv: Tensor, like: Tensor) -> Tensor:
    # Sequence-level advantages (B,) apply to every token of their sequence.
    adv = adv.detach()
    return adv.unsqueeze(-1) if adv.dim() == like.dim() - 1 else adv


def _clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss ``max(-A r, -A clip(r))`` and where the clipped branch wins."""
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # The max is the pessimistic bound: once a token's ratio has moved past the
    # clip in the direction the advantage favours, it stops receiving gradient.
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def ratio_stats(logp: Tensor, old_logp: Tensor, mask: Tensor, norm: LossNorm | None = None) -> dict[str, Tensor]:
    """``approx_kl``: token mean of ``0.5 * (logp - old_logp)**2`` (k2 between the
    updated and the sampling policy, as in Huang et al., 2023); 0 at an update's start."""
    with torch.no_grad():
        n = norm.n_tokens if norm is not None else None
        return {"approx_kl": token_mean(0.5 * (logp - old_logp.detach()) ** 2, mask, n)}


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    agg: str = "token-mean",
    norm: LossNorm | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al., 2017), aggregated by ``agg`` (default: token mean).

    ``advantages`` is (B, T) or (B,). Stats: ``clip_frac`` (share of real tokens
    where the clipped branch is active) and ``approx_kl`` (:func:`ratio_stats`).
    """
    loss_t, clipped = _clipped_surrogate(logp, old_logp, _per_token(advantages, logp), clip_eps)
    loss = aggregate(loss_t, mask, agg, norm)
    with torch.no_grad():
        n = norm.n_tokens if norm is not None else None
        stats = {"clip_frac": token_mean(clipped.float(), mask, n), **ratio_stats(logp, old_logp, mask, norm)}
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    norm: LossNorm | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (clip(v, old +- eps) - R)^2))``, a token
    mean (over ``norm.n_tokens`` when given).

    Value clipping keeps the critic near the values that produced the
    advantages (Huang et al., 2023, following openai/lm-human-preferences).
    ``clip_eps=None`` disables it. Stats: ``vf_clip_frac``, the share of real
    tokens where the clipped error is the larger one.
    """
    n = norm.n_tokens if norm is not None else None
    old_values, returns = old_values.detach(), returns.detach()
    err = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * token_mean(err, mask, n), {"vf_clip_frac": torch.zeros((), device=values.device)}
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clipped), mask, n)
    with torch.no_grad():
        stats = {"vf_clip_frac": token_mean((err_clipped > err).float(), mask, n)}
    return loss, stats


def policy_gradient_loss(
    logp: Tensor, advantages: Tensor, mask: Tensor, agg: str = "token-mean", norm: LossNorm | None = None
) -> Tensor:
    """REINFORCE / RLOO loss ``-A * logp`` aggregated by ``agg`` (default: token mean);
    ``advantages`` (B,) or (B, T). On-policy only: no importance ratio."""
    return aggregate(-_per_token(advantages, logp) * logp, mask, agg, norm)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    kl_estimator: str = "k3",
    agg: str = "seq-mean-token-mean",
    norm: LossNorm | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO objective (Shao et al., 2024, DeepSeekMath), negated to a loss.

    Per token: clipped surrogate with the sequence's advantage (B,) plus
    ``kl_coef * KL_t`` with the per-token ``kl_estimator`` (the paper: k3; k1 is
    no use as a loss term: its expected gradient is 0); the KL is a loss term
    rather than a reward penalty, so it does not enter the advantages.
    Aggregation ``agg``: the paper's mean over each sequence's real tokens, then
    over sequences (each sequence weighs the same whatever its length), or the
    others of :func:`aggregate` (Dr. GRPO: ``seq-mean-token-sum-norm``).

    Stats: ``kl`` (the KL term, same aggregation), ``clip_frac`` and
    ``approx_kl`` (token means, as in :func:`ppo_policy_loss`).
    """
    pg_t, clipped = _clipped_surrogate(logp, old_logp, _per_token(advantages, logp), clip_eps)
    kl_t = kl_estimate(logp, ref_logp.detach(), kl_estimator)
    loss = aggregate(pg_t + kl_coef * kl_t, mask, agg, norm)
    with torch.no_grad():
        n = norm.n_tokens if norm is not None else None
        stats = {
            "kl": aggregate(kl_t, mask, agg, norm),
            "clip_frac": token_mean(clipped.float(), mask, n),
            **ratio_stats(logp, old_logp, mask, norm),
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
