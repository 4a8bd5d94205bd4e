"""Stage 3: RLHF with PPO (algo=ppo), InstructGPT step 3.

    python train.py algo=ppo init_from=<sft last.ckpt> algo.reward.model=<reward last.ckpt>

Each iteration (the shared part: rl_stage.py; sampling, scoring, log-probs: rollout.py; step
accounting: rl_update.py):

1. sample responses to a batch of prompts; score them with the reward (a reward model
   normalized by its stored statistics, and/or callables); subtract `missing_eos_penalty` from
   responses cut off at `max_new_tokens`; clip to +-`reward_clip`;
2. per-token rewards: the score at the last response token, and the KL penalty
   -beta * (log pi - log pi_ref) on every token (`lmforge.rl.token_rewards`); beta is fixed or
   follows the adaptive controller of Ziegler et al. (2019) towards `kl_target`;
3. values from the critic -- a ScalarModel initialized from the reward model (`critic:
   reward_model`, its head rescaled by `rewards.normalized_head` so it starts by predicting the
   NORMALIZED reward: the reward model's score standardized with the statistics stored by the
   reward stage on its validation pairs, or with `reward_stats_from: policy` measured on the
   initial policy's samples at the start of the run) or a value
   head on the policy's own hidden states (`critic: policy_head`);
4. GAE (gamma=1, lambda=0.95), advantages whitened over the batch's real tokens;
5. `ppo_epochs` passes of shuffled minibatches: clipped surrogate (eps=0.2), clipped value
   loss * vf_coef, optional entropy bonus, optional PPO-ptx SFT loss, each a token mean over the
   whole update (every micro-batch and rank: the gradient does not depend on micro_batch_size
   or the number of ranks; `loss_agg` for the policy loss); gradient accumulation over
   micro-batches; gradient-norm clipping.

The details follow "The N Implementation Details of RLHF with PPO" (Huang et al., 2023):
log-probs recomputed from logits divided by the sampling temperature, everything after the
first EOS masked, per-token KL in the reward, reward at the last token, whitened advantages,
clipped value loss, no dropout in policy, reference or critic, a different sampling seed per
rank and iteration.

Steps: one trainer step = one iteration of ppo_epochs * (rows / minibatch_size) optimizer
updates; trainer.max_steps counts iterations (see rl_update.py).

The checkpoint is the policy (`model.*`, a CausalLM, loadable as init_from of another RL run, by the
sampler and by the HF exporter) plus the critic (`critic.*` or `value_head.*`, for resuming); lineage
records the SFT, reward and critic checkpoints it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn

from lmforge.algos.rl_config import RLConfig
from lmforge.algos.rl_stage import RLStageModule, build_rl_stage
from lmforge.algos.rollout import Rollout, response_logits
from lmforge.hf.importer import load_any_checkpoint
from lmforge.model import ScalarModel
from lmforge.rewards.reward_model import RewardModelSource, normalized_head
from lmforge.rl import (
    explained_variance,
    gae_advantages,
    logprobs_from_logits,
    masked_whiten,
    ppo_policy_loss,
    token_entropy,
    token_mean,
    value_loss,
)
from lmforge.training.checkpoint import (
    CheckpointError,
    load_matching,
    require_stage,
    submodule_state,
)

log = logging.getLogger(__name__)

CRITICS = ("reward_model", "policy_head")


@dataclass
class PPOConfig(RLConfig):
    name: str = "ppo"
    # reward_model: a separate ScalarModel initialized from critic_from (default: the reward
    # model source); policy_head: a linear value head on the policy's hidden states.
    critic: str = "reward_model"
    # A reward checkpoint (backbone and head), or a pretrain/SFT one (backbone; a zero head).
    critic_from: Optional[str] = None
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    vf_coef: float = 0.1
    vf_clip_eps: Optional[float] = 0.2
    ent_coef: float = 0.0
    ppo_epochs: int = 4
    missing_eos_penalty: float = 1.0


class PPOModule(RLStageModule):
    stage = "ppo"

    def __init__(self, cfg, tokenizer, reward):
        super().__init__(cfg, tokenizer, reward)
        algo = cfg.algo
        self.critic: ScalarModel | None = None  # set by init_critic (critic: reward_model)
        self.value_head: nn.Linear | None = None
        if algo.critic == "policy_head":
            self.value_head = nn.Linear(self.model_cfg.d_model, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def init_critic(self, path: str) -> None:
        """The critic from a reward model (its head with the reward normalization folded in,
        `lmforge.rewards.reward_model.normalized_head`, so it predicts the normalized reward the policy is
        trained on) or from a language model's backbone with a zero head."""
        ckpt = load_any_checkpoint(path)
        require_stage(ckpt, ("reward", "pretrain", "sft", "ppo"), "algo.critic_from")
        critic = ScalarModel(replace(ckpt.model_config, dropout=0.0))
        if ckpt.stage == "reward":
            load_matching(critic, submodule_state(ckpt.state_dict, "model"), f"algo.critic_from={path}")
            weight, bias = normalized_head(self._reward_source(path, ckpt))
            with torch.no_grad():
                critic.head.weight.copy_(weight)
                critic.head.bias.copy_(bias)
        else:
            load_matching(
                critic.backbone, submodule_state(ckpt.state_dict, "model.backbone"), f"algo.critic_from={path}"
            )
            nn.init.zeros_(critic.head.weight)
            nn.init.zeros_(critic.head.bias)
        if ckpt.tokenizer.proto() != self.tokenizer.proto():
            raise CheckpointError(
                f"algo.critic_from={path} uses a different tokenizer than the policy; the critic "
                "reads the policy's tokens: use a critic of the same lineage, or algo.critic=policy_head"
            )
        self.critic = critic
        self.lineage["critic_from"] = str(path)

    def _reward_source(self, path: str, ckpt) -> RewardModelSource:
        """The reward source `path` is (normalized as it scores), else the checkpoint as a source
        normalized by its own stored statistics (unnormalized when it has none)."""
        for rm in self.reward.reward_models:
            if rm.path == str(path):
                return rm
        return RewardModelSource(
            path, tokenizer=self.tokenizer, normalize=bool(ckpt.meta.get("reward_stats")), name="critic"
        )

    # -- networks ------------------------------------------------------------------------------
    def policy_forward(self, sequences, attention_mask, prompt_len, values: bool = True):
        if self.value_head is not None:
            return response_logits(
                self.model, sequences, attention_mask, prompt_len, self.value_head if values else None
            )
        logits, _ = response_logits(self.model, sequences, attention_mask, prompt_len)
        v = None
        if values:
            v = self.critic(sequences, attention_mask=attention_mask)[:, prompt_len - 1 : -1].float()
        return logits, v

    # -- advantages ------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_advantages(self, ro: Rollout) -> dict[str, Tensor]:
        algo = self.cfg.algo
        m = ro.response_mask
        rewards = self.kl_shaped_rewards(ro)
        if algo.whiten_rewards:
            rewards = masked_whiten(rewards, m, shift_mean=False, reduce=self.reduce)
        adv, ro.returns = gae_advantages(rewards, ro.values, m, algo.gamma, algo.lam)
        if algo.whiten_advantages:
            adv = masked_whiten(adv, m, reduce=self.reduce)
        ro.advantages = adv
        return {
            "train/explained_var": explained_variance(ro.values, ro.returns, m, reduce=self.reduce),
            "rollout/value_mean": self.global_mean(ro.values, m),
            "rollout/kl_penalty": self.global_mean((-self.kl_ctl.value * ro.kl).sum(-1)),
        }

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, mb: dict) -> tuple[Tensor, dict[str, Tensor]]:
        algo = self.cfg.algo
        P, m = mb["prompt_len"], mb["response_mask"]
        norm = self.norm_of(mb)
        logits, values = self.policy_forward(mb["sequences"], mb["attention_mask"], P)
        logits = self.tempered(logits)  # the sampling distribution (rollout.py: tempered)
        logp = logprobs_from_logits(logits, mb["sequences"][:, P:])
        pg, pg_stats = ppo_policy_loss(
            logp, mb["old_logprobs"], mb["advantages"], m, algo.clip_eps, algo.loss_agg, norm
        )
        vf, vf_stats = value_loss(values, mb["old_values"], mb["returns"], m, algo.vf_clip_eps, norm)
        loss = pg + algo.vf_coef * vf
        stats = {"policy_loss": pg.detach(), "value_loss": vf.detach(), **pg_stats, **vf_stats}
        if algo.ent_coef:
            entropy = token_mean(token_entropy(logits), m, norm.n_tokens)
            loss = loss - algo.ent_coef * entropy
            stats["entropy"] = entropy.detach()
        return loss, stats


def build(cfg, run_dir):
    from lmforge.errors import ConfigError

    algo = cfg.algo
    if algo.critic not in CRITICS:
        raise ConfigError(f"algo.critic={algo.critic!r}: use one of {CRITICS}")
    if algo.clip_eps is None:
        raise ConfigError("algo.clip_eps must be a number for PPO (0.2 is standard)")
    module, dm = build_rl_stage(cfg, run_dir, PPOModule)
    if algo.critic == "reward_model":
        path = algo.critic_from
        if path is None:
            rms = module.reward.reward_models
            if len(rms) != 1:
                raise ConfigError(
                    f"algo.critic=reward_model initializes the critic from THE reward model, but algo.reward has "
                    f"{len(rms)}: set algo.critic_from=<a reward checkpoint, or the SFT checkpoint for a fresh "
                    "value head on its backbone>, or use algo.critic=policy_head"
                )
            path = rms[0].path
        module.init_critic(path)
    return module, dm


CONFIG = PPOConfig
