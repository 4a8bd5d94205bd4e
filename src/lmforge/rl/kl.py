"""KL penalties between the policy and the frozen reference model.

Per-token estimators of KL(pi || pi_ref) from the log-probs of tokens *sampled
from pi* (Schulman, "Approximating KL Divergence", 2020). With
``log_r = ref_logp - logp``:

* k1 = -log_r                 unbiased, high variance, can be negative per token
* k2 = 0.5 * log_r**2          biased (low for close policies), low variance, >= 0
* k3 = (r - 1) - log_r         unbiased, low variance, >= 0

The KL controllers follow Ziegler et al. (2019), as reproduced in "The N
Implementation Details of RLHF with PPO" (Huang et al., 2023).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``logp - ref_logp`` per token."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``0.5 * (logp - ref_logp)**2`` per token."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``exp(ref_logp - logp) - (ref_logp - logp) - 1`` per token.

    Not clamped: a huge value means the policy left the reference's support,
    which the caller should see rather than have hidden.
    """
    log_r = ref_logp - logp
    # expm1 keeps precision when the policies are close, the common case.
    return torch.expm1(log_r) - log_r


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate, ``kind`` in {"k1", "k2", "k3"}."""
    try:
        fn = _ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(_ESTIMATORS)}") from None
    return fn(logp, ref_logp)


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), as in openai/lm-human-preferences.

    A proportional controller that steers the measured KL towards ``target``:
    ``e = clip(kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    The clip bounds how fast the coefficient can move on a noisy KL reading.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Update from the KL of the last batch of ``n_steps`` samples; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        # Only the learned coefficient; target/horizon come from the config.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
