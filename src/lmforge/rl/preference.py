"""Offline preference optimization: DPO, conservative DPO, IPO and SimPO losses.

These train the policy directly on preference pairs, with no reward model and no sampling.
Inputs are per-PAIR sequence log-probabilities, (B,) tensors: ``policy_chosen[i]`` is
log pi(y_chosen_i | x_i) summed over the response tokens (EOS included), ``ref_*`` the same
under the frozen reference policy (the SFT model). Each loss returns ``(loss, stats)``; stats
are detached scalars, ready to log:

* ``rewards_chosen`` / ``rewards_rejected``: mean implicit reward of each side,
  ``beta * (log pi - log ref)`` for DPO and IPO, ``beta * mean-token log pi`` for SimPO;
* ``reward_margin``: mean of chosen minus rejected implicit reward;
* ``accuracy``: share of pairs whose chosen implicit reward is higher (ties count as wrong).

DPO (Rafailov et al., 2023). The KL-regularized RL objective has the closed-form optimum
pi*(y|x) = ref(y|x) exp(r(x,y) / beta) / Z(x), so r = beta log(pi/ref) + beta log Z(x); in the
Bradley-Terry likelihood the partition function cancels between the two responses of a pair:

    h    = beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]
    loss = -log sigmoid(h)

Conservative DPO (``label_smoothing`` eps, Mitchell 2023): each label is wrong with
probability eps, so ``loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)``; its minimum
is at a finite h, so the policy does not run to infinity on noisy labels.

IPO (Azar et al., 2023): DPO's loss keeps pushing h up even when the preference is
deterministic, which drives the policy away from the reference however large beta is. IPO
regresses the log-ratio difference onto a fixed target instead:

    h    = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    loss = (h - 1 / (2 beta))^2

(the paper's tau is ``beta`` here; the log-probabilities are the sequence sums, as in the paper).

SimPO (Meng et al., 2024): reference-free; the implicit reward is the LENGTH-AVERAGED log
probability (the quantity generation ranks by), with a target margin gamma:

    h    = beta * (mean_t log pi(y_c) - mean_t log pi(y_r)) - gamma
    loss = -log sigmoid(h)        (with label smoothing as for cDPO)

``logsigmoid`` instead of ``log(sigmoid())``: the latter underflows to -inf for confidently
wrong pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")


def sequence_logprobs(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) sum over real tokens of ``token_logps`` (B, T), and (B,) the number of them.

    ``where``, not a product with the mask: the log-probability of a padding position may be
    -inf, and -inf * 0 is nan."""
    m = mask.bool()
    total = torch.where(m, token_logps.float(), 0.0).sum(-1)
    return total, m.sum(-1)


def _smoothed_logsigmoid_loss(h: Tensor, label_smoothing: float) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
    loss = -F.logsigmoid(h)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-h)
    return loss.mean()


def _stats(r_chosen: Tensor, r_rejected: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        r_c, r_r = r_chosen.detach().float(), r_rejected.detach().float()
        return {
            "rewards_chosen": r_c.mean(),
            "rewards_rejected": r_r.mean(),
            "reward_margin": (r_c - r_r).mean(),
            "accuracy": (r_c > r_r).float().mean(),
        }


def _log_ratios(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """(log pi/ref of the chosen responses, of the rejected ones), in fp32."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    return policy_chosen.float() - ref_chosen.float(), policy_rejected.float() - ref_rejected.float()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO's loss (conservative DPO with ``label_smoothing`` > 0); see the module docstring."""
    ratio_c, ratio_r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    r_c, r_r = beta * ratio_c, beta * ratio_r
    return _smoothed_logsigmoid_loss(r_c - r_r, label_smoothing), _stats(r_c, r_r)


def ipo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO's squared loss towards the log-ratio margin 1 / (2 beta); see the module docstring."""
    ratio_c, ratio_r = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = ((ratio_c - ratio_r - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _stats(beta * ratio_c, beta * ratio_r)


def simpo_loss(
    policy_chosen_avg: Tensor,
    policy_rejected_avg: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO's loss on LENGTH-AVERAGED policy log-probabilities (no reference); see the module
    docstring."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    r_c, r_r = beta * policy_chosen_avg.float(), beta * policy_rejected_avg.float()
    return _smoothed_logsigmoid_loss(r_c - r_r - gamma, label_smoothing), _stats(r_c, r_r)
