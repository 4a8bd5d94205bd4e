"""Critic-free policy-gradient RLHF: REINFORCE, RLOO and GRPO (algo=reinforce | rloo | grpo).

    python train.py algo=rloo init_from=<sft last.ckpt> algo.reward.model=<reward last.ckpt>

They share PPO's rollouts (rollout.py: sampling, scoring, the reference log-probs, the
missing-EOS penalty, reward clipping, the per-rank seeds; rl_update.py: step accounting) and
differ only in the advantage and the loss:

* REINFORCE (Williams, 1992): per-token rewards as in PPO (score at the last token, KL penalty
  -beta * KL on every token), the discounted reward-to-go G_t (`discounted_returns`, gamma),
  minus a moving-average baseline of past batches' mean return (`baseline_momentum`);
* RLOO (Kool et al., 2019; Ahmadian et al., 2024): `samples_per_prompt` = k responses per prompt;
  sequence reward R = score - beta * sum_t KL_t; advantage R_i - mean_{j != i} R_j (leave one out);
* GRPO (Shao et al., 2024): k responses per prompt; advantage (r_i - mean(group)) / std(group);
  the KL to the reference is a loss term (`kl_estimator`, default k3 as in the paper; k2 also
  works; k1 is refused: its expected gradient as a loss is 0; coefficient kl_coef), not part of
  the reward. Defaults as in DeepSeekMath: `scale_rewards: true`, `loss_agg:
  seq-mean-token-mean` (mean over each response's tokens, then over the update's responses).
  Dr. GRPO (Liu et al., 2025) removes both biases: `scale_rewards=false` (no division by the
  group's std) and `loss_agg=seq-mean-token-sum-norm` (token sums / `loss_agg_const`, default
  max_new_tokens: a short response's tokens no longer weigh more).

Loss: with `clip_eps: null` the plain policy gradient -A * log pi (REINFORCE and RLOO default),
on-policy only: no importance ratio, so exactly one update per rollout (`ppo_epochs: 1`,
`minibatch_size` = rows; check_rl_config refuses more); with a number the clipped surrogate,
which several updates per rollout need (GRPO default). Aggregated by `loss_agg` (REINFORCE and
RLOO: token-mean) over the whole update, whatever the micro-batch split (rl_update.py). No critic:
the checkpoint is the policy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lmforge.algos.rl_config import RLConfig
from lmforge.algos.rl_stage import RLStageModule, build_rl_stage
from lmforge.algos.rollout import Rollout
from lmforge.rl import (
    MovingAverageBaseline,
    discounted_returns,
    grpo_advantages,
    grpo_loss,
    masked_whiten,
    policy_gradient_loss,
    ppo_policy_loss,
    ratio_stats,
    rloo_advantages,
)
from lmforge.rl.stats import masked_mean


@dataclass
class PGConfig(RLConfig):
    clip_eps: Optional[float] = None
    whiten_advantages: bool = False


@dataclass
class ReinforceConfig(PGConfig):
    name: str = "reinforce"
    gamma: float = 1.0  # discount of the reward-to-go
    baseline_momentum: float = 0.9  # moving average of past batches' mean return


@dataclass
class RLOOConfig(PGConfig):
    name: str = "rloo"
    samples_per_prompt: int = 4


@dataclass
class GRPOConfig(PGConfig):
    name: str = "grpo"
    samples_per_prompt: int = 4
    clip_eps: Optional[float] = 0.2
    kl_coef: float = 0.04  # coefficient of the KL loss term
    kl_estimator: str = "k3"  # of the KL loss term: k3 (the paper) or k2; k1 has no expected gradient
    scale_rewards: bool = True  # divide by the group's std (false: Dr. GRPO, with seq-mean-token-sum-norm)
    loss_agg: str = "seq-mean-token-mean"  # DeepSeekMath; Dr. GRPO: seq-mean-token-sum-norm


class PolicyGradientModule(RLStageModule):
    """The shared loss: plain policy gradient, or the clipped surrogate when clip_eps is set."""

    def sequence_advantages(self, adv: Tensor) -> Tensor:
        if self.cfg.algo.whiten_advantages:
            adv = masked_whiten(adv, torch.ones_like(adv, dtype=torch.bool), reduce=self.reduce)
        return adv

    def new_logprobs(self, mb: dict) -> Tensor:
        P = mb["prompt_len"]
        logits, _ = self.policy_forward(mb["sequences"], mb["attention_mask"], P, values=False)
        return self.token_logprobs(logits, mb["sequences"][:, P:])

    def loss(self, mb: dict) -> tuple[Tensor, dict[str, Tensor]]:
        algo = self.cfg.algo
        m, norm = mb["response_mask"], self.norm_of(mb)
        logp = self.new_logprobs(mb)
        if algo.clip_eps is None:  # on-policy only (check_rl_config: one update per rollout)
            loss = policy_gradient_loss(logp, mb["advantages"], m, algo.loss_agg, norm)
            stats = ratio_stats(logp, mb["old_logprobs"], m, norm)
        else:
            loss, stats = ppo_policy_loss(
                logp, mb["old_logprobs"], mb["advantages"], m, algo.clip_eps, algo.loss_agg, norm
            )
        return loss, {"policy_loss": loss.detach(), **stats}


class ReinforceModule(PolicyGradientModule):
    stage = "reinforce"

    def __init__(self, cfg, tokenizer, reward):
        super().__init__(cfg, tokenizer, reward)
        self.baseline = MovingAverageBaseline(cfg.algo.baseline_momentum)

    @torch.no_grad()
    def compute_advantages(self, ro: Rollout) -> dict[str, Tensor]:
        algo = self.cfg.algo
        m = ro.response_mask
        rewards = self.kl_shaped_rewards(ro)
        returns = discounted_returns(rewards, m, algo.gamma)
        batch_mean = masked_mean(returns, m, reduce=self.reduce)
        # The baseline of PAST batches keeps the estimator unbiased; the first batch has none yet.
        b = self.baseline.value if self.baseline.n_updates else float(batch_mean)
        self.baseline.update(batch_mean)
        adv = torch.where(m, returns - b, 0.0)
        if algo.whiten_advantages:
            adv = masked_whiten(adv, m, reduce=self.reduce)
        ro.advantages = adv
        return {"train/baseline": torch.tensor(b), "rollout/return_mean": batch_mean}

    def extra_state(self):
        return {"baseline": self.baseline.state_dict()}

    def load_extra_state(self, state):
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])


class RLOOModule(PolicyGradientModule):
    stage = "rloo"

    @torch.no_grad()
    def compute_advantages(self, ro: Rollout) -> dict[str, Tensor]:
        algo = self.cfg.algo
        ro.kl = self.token_kl_estimate(ro)
        seq_reward = ro.scores - self.kl_ctl.value * ro.kl.sum(-1)
        ro.advantages = self.sequence_advantages(rloo_advantages(seq_reward, algo.samples_per_prompt))
        return {"rollout/rlhf_reward": self.global_mean(seq_reward)}


class GRPOModule(PolicyGradientModule):
    stage = "grpo"

    @torch.no_grad()
    def compute_advantages(self, ro: Rollout) -> dict[str, Tensor]:
        algo = self.cfg.algo
        adv = grpo_advantages(ro.scores, algo.samples_per_prompt, scale=algo.scale_rewards)
        ro.advantages = self.sequence_advantages(adv)
        groups = ro.scores.view(-1, algo.samples_per_prompt)
        # Groups whose samples all scored the same teach nothing (advantage 0).
        return {"rollout/flat_group_frac": self.global_mean((groups.std(-1) == 0).float())}

    def loss(self, mb: dict) -> tuple[Tensor, dict[str, Tensor]]:
        algo = self.cfg.algo
        logp = self.new_logprobs(mb)
        loss, stats = grpo_loss(
            logp,
            mb["old_logprobs"],
            mb["ref_logprobs"],
            mb["advantages"],
            mb["response_mask"],
            algo.clip_eps,
            self.kl_ctl.value,
            algo.kl_estimator,
            algo.loss_agg,
            self.norm_of(mb),
        )
        return loss, {"policy_loss": loss.detach(), **stats}


MODULES = {"reinforce": ReinforceModule, "rloo": RLOOModule, "grpo": GRPOModule}


def build(cfg, run_dir):
    from lmforge.errors import ConfigError

    algo = cfg.algo
    if algo.name in ("rloo", "grpo") and algo.samples_per_prompt < 2:
        raise ConfigError(f"algo={algo.name} compares samples of the same prompt: set algo.samples_per_prompt >= 2")
    if algo.name == "grpo" and algo.clip_eps is None:
        raise ConfigError("algo.clip_eps must be a number for GRPO (0.2 is standard)")
    if algo.name == "grpo" and algo.kl_estimator == "k1":
        raise ConfigError(
            "algo.kl_estimator=k1 as GRPO's KL loss term has an expected gradient of 0 (it would not "
            "hold the policy near the reference): use algo.kl_estimator=k3 (the paper) or k2"
        )
    if algo.name == "reinforce" and not 0.0 <= algo.baseline_momentum < 1.0:
        raise ConfigError(f"algo.baseline_momentum={algo.baseline_momentum} must be in [0, 1)")
    return build_rl_stage(cfg, run_dir, MODULES[algo.name])


CONFIGS = [ReinforceConfig, RLOOConfig, GRPOConfig]
