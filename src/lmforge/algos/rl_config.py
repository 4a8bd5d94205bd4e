"""The config every RL stage shares (algo.*, `RLConfig`) and the start-up check of it
(`check_rl_config`), which refuses settings that cannot work, naming the key to change.
Used by rl_stage.py (the shared RL module) and the stage configs of ppo.py and pg.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lmforge.rewards.reward_function import RLRewardConfig
from lmforge.rl import LOSS_AGGS
from lmforge.training.optim import OptimConfig


def _rl_optim() -> OptimConfig:
    # A small constant LR after a short warmup (Adam's first steps move every weight by ~lr
    # whatever its gradient), no weight decay pulling the policy away from the SFT model; the
    # module clips the gradient norm to grad_clip itself (manual optimization).
    return OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=5, min_lr_ratio=1.0, grad_clip=1.0)


@dataclass
class RLConfig:
    """Fields every RL stage shares (algo.*). Batch sizes are per rank."""

    name: str = "?"
    reward: RLRewardConfig = field(default_factory=RLRewardConfig)
    # The frozen reference the KL is measured against; default: init_from.
    ref_from: Optional[str] = None
    # -- rollouts
    rollout_batch_size: int = 32  # prompts per rank and iteration
    samples_per_prompt: int = 1  # responses per prompt (RLOO/GRPO groups: >= 2)
    max_new_tokens: int = 16
    # Decode with a static-shape KV cache (every step attends over all columns): lets a compiled
    # policy (compile=true) reuse one compiled decode step; slower in eager mode.
    static_cache: bool = False
    max_prompt_tokens: int = 96  # longer prompts lose tokens from the left
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # The mean and std that normalize each reward model's scores (normalize: true): reward_model
    # = stored by the reward stage (its validation pairs); policy = measured at the start of RL on
    # the initial policy's responses (one each, at `temperature`) to the first
    # `reward_stats_prompts` training prompts (Huang et al., 2023). The PPO critic's initial
    # head folds in the same statistics.
    reward_stats_from: str = "reward_model"
    reward_stats_prompts: int = 256
    # -- reward shaping
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut at max_new_tokens
    reward_clip: float = 0.0  # clip scores to [-reward_clip, reward_clip]; 0 = off
    kl_coef: float = 0.05  # beta (GRPO: the KL loss coefficient)
    kl_estimator: str = "k1"  # k1 | k2 | k3, per token (lmforge.rl.kl)
    # Stop the run once the rollouts' KL to the reference (rollout/kl, nats per response) exceeds
    # this budget: past it, a learned reward is mostly being over-optimized (Gao et al., 2022). 0 = off.
    kl_budget: float = 0.0
    adaptive_kl: bool = False  # Ziegler et al.'s proportional controller towards kl_target
    kl_target: float = 6.0  # nats per sequence
    kl_horizon: int = 10000  # samples
    # -- updates
    ppo_epochs: int = 1
    minibatch_size: int = 32  # sequences per optimizer update
    micro_batch_size: int = 32  # sequences per forward/backward (accumulation = minibatch / micro)
    clip_eps: Optional[float] = 0.2  # ratio clipping; null = plain policy gradient (REINFORCE/RLOO)
    # How per-token policy losses become the update's loss (lmforge.rl.losses.aggregate), always
    # over the whole update (every micro-batch, every rank): token-mean | seq-mean-token-mean
    # (DeepSeekMath GRPO) | seq-mean-token-sum-norm (Dr. GRPO: token sums / loss_agg_const).
    loss_agg: str = "token-mean"
    loss_agg_const: Optional[float] = None  # seq-mean-token-sum-norm's divisor; null = max_new_tokens
    whiten_advantages: bool = False
    optim: OptimConfig = field(default_factory=_rl_optim)
    # -- PPO-ptx: + ptx_coef * SFT language-modeling loss on the source's SFT pairs
    ptx_coef: float = 0.0
    ptx_batch_size: int = 8
    ptx_seq_len: int = 128
    # -- held-out evaluation (every trainer.eval_every iterations) and samples
    eval_prompts: int = 128
    eval_batch_size: int = 64
    eval_temperature: float = 0.0  # 0 = greedy
    eval_max_new_tokens: int = 16
    eval_at_start: bool = True  # evaluate the initial policy too (logged at step 0)
    # Also evaluate this many prompts of the synthetic world's hard split (longer numbers), logged
    # as val_hard/*, apart from val/*; 0 = off, so a default run costs nothing more.
    eval_hard_prompts: int = 0
    sample_every: int = 10  # a table of rollouts every this many iterations (0 = never)
    n_samples: int = 4


def check_rl_config(cfg) -> None:
    """Refuse RL settings that cannot work, naming the key to change."""
    from lmforge.errors import ConfigError

    a = cfg.algo
    rows = a.rollout_batch_size * a.samples_per_prompt

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    check(
        cfg.init_from is not None,
        f"algo={a.name} improves an existing language model: set init_from=<an SFT (or pretraining) checkpoint>",
    )
    check(
        a.rollout_batch_size > 0 and a.samples_per_prompt > 0 and a.minibatch_size > 0 and a.micro_batch_size > 0,
        "algo.rollout_batch_size, samples_per_prompt, minibatch_size and micro_batch_size must be positive",
    )
    check(
        rows % a.minibatch_size == 0,
        f"algo.rollout_batch_size * algo.samples_per_prompt = {rows} responses per iteration must be a multiple "
        f"of algo.minibatch_size={a.minibatch_size}",
    )
    check(
        a.minibatch_size % a.micro_batch_size == 0,
        f"algo.minibatch_size={a.minibatch_size} must be a multiple of algo.micro_batch_size={a.micro_batch_size}",
    )
    check(a.ppo_epochs >= 1, f"algo.ppo_epochs={a.ppo_epochs} must be >= 1")
    check(
        a.temperature > 0,
        f"algo.temperature={a.temperature} must be > 0 for RL sampling (0 would be greedy: "
        "no exploration, and log-probs at temperature 0 are undefined)",
    )
    check(
        a.max_new_tokens >= 1 and a.eval_max_new_tokens >= 1, "algo.max_new_tokens and eval_max_new_tokens must be >= 1"
    )
    longest = a.max_prompt_tokens + max(a.max_new_tokens, a.eval_max_new_tokens)
    check(
        longest <= cfg.model.max_seq_len,
        f"algo.max_prompt_tokens={a.max_prompt_tokens} + max new tokens = {longest} exceeds model.max_seq_len="
        f"{cfg.model.max_seq_len}: lower algo.max_prompt_tokens or algo.max_new_tokens",
    )
    check(a.kl_estimator in ("k1", "k2", "k3"), f"algo.kl_estimator={a.kl_estimator!r}: use k1, k2 or k3")
    check(
        a.top_k is None and a.top_p is None,
        f"algo.top_k={a.top_k} / algo.top_p={a.top_p}: RL samples from the full softmax at algo.temperature "
        "(the old, reference and new log-probs, the ratios and the KL are computed under it; a filtered "
        "sampler would make them wrong): set algo.top_k=null and algo.top_p=null, and use algo.temperature",
    )
    check(
        a.clip_eps is not None or (a.ppo_epochs == 1 and a.minibatch_size == rows),
        f"algo.clip_eps=null is the plain (on-policy) policy gradient: it has no importance ratio, so it "
        f"allows one optimizer update per rollout, but algo.ppo_epochs={a.ppo_epochs} and "
        f"algo.minibatch_size={a.minibatch_size} of {rows} responses give "
        f"{a.ppo_epochs * max(rows // max(a.minibatch_size, 1), 1)} updates, all but the first on stale samples: "
        f"set algo.minibatch_size={rows} and algo.ppo_epochs=1 (accumulate with algo.micro_batch_size), "
        "or set algo.clip_eps (e.g. 0.2) for the clipped surrogate",
    )
    check(
        a.reward_stats_from in ("reward_model", "policy"),
        f"algo.reward_stats_from={a.reward_stats_from!r}: use reward_model (the reward stage's stored statistics) "
        "or policy (measured on the initial policy's samples)",
    )
    check(a.reward_stats_prompts >= 2, f"algo.reward_stats_prompts={a.reward_stats_prompts} must be >= 2")
    check(a.loss_agg in LOSS_AGGS, f"algo.loss_agg={a.loss_agg!r}: use one of {', '.join(LOSS_AGGS)}")
    check(
        a.loss_agg_const is None or a.loss_agg_const > 0,
        f"algo.loss_agg_const={a.loss_agg_const} must be > 0 (or null: algo.max_new_tokens)",
    )
    check(
        cfg.trainer.accumulate_grad_batches == 1,
        "trainer.accumulate_grad_batches must be 1 for RL stages: accumulation is algo.minibatch_size / "
        "algo.micro_batch_size",
    )
    check(a.clip_eps is None or a.clip_eps > 0, f"algo.clip_eps={a.clip_eps} must be > 0 (or null)")
    check(a.kl_budget >= 0, f"algo.kl_budget={a.kl_budget} must be >= 0 (nats per response; 0 = no budget)")
    check(
        a.eval_hard_prompts <= 0 or cfg.data.source == "synthetic",
        f"algo.eval_hard_prompts={a.eval_hard_prompts}: the hard split is the synthetic world's; set "
        "data=synthetic, or algo.eval_hard_prompts=0",
    )
    check(
        a.missing_eos_penalty >= 0 and a.reward_clip >= 0, "algo.missing_eos_penalty and algo.reward_clip must be >= 0"
    )
