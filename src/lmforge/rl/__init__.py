"""RL math for RLHF as small pure torch functions (no Lightning).

Token-level tensors are (B, T) over response tokens with a ``mask`` that is 1
up to and including the first EOS and 0 after. See "The N Implementation
Details of RLHF with PPO" (Huang et al., 2023) for the conventions followed.
"""

from .advantages import (
    MovingAverageBaseline,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    last_token_index,
    rloo_advantages,
    token_rewards,
)
from .ensemble import ENSEMBLE_MODES, ensemble_reward, ensemble_std
from .kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3
from .losses import (
    LOSS_AGGS,
    LossNorm,
    aggregate,
    bradley_terry_loss,
    entropy_from_logits,
    grpo_loss,
    logprobs_from_logits,
    policy_gradient_loss,
    ppo_policy_loss,
    ratio_stats,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_entropy,
    token_mean,
    value_loss,
)
from .preference import PREFERENCE_LOSSES, dpo_loss, ipo_loss, sequence_logprobs, simpo_loss
from .stats import explained_variance, masked_mean, masked_var, masked_whiten

__all__ = [
    "ENSEMBLE_MODES",
    "LOSS_AGGS",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "LossNorm",
    "aggregate",
    "FixedKLController",
    "MovingAverageBaseline",
    "bradley_terry_loss",
    "discounted_returns",
    "dpo_loss",
    "ensemble_reward",
    "ensemble_std",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "grpo_loss",
    "ipo_loss",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "ratio_stats",
    "rloo_advantages",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "sequence_logprobs",
    "simpo_loss",
    "token_entropy",
    "token_mean",
    "token_rewards",
    "value_loss",
]
