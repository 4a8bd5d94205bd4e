"""What the RL stages share: `RLStageModule`, the LightningModule skeleton of one RL iteration,
and `build_rl_stage`. ppo.py and pg.py (REINFORCE, RLOO, GRPO) differ only in how they turn a
scored rollout into advantages and a loss.

Not a stage itself (no CONFIG): the stage modules import it. `RLStageModule` is assembled from
parts, one file each: making and scoring the rollout (rollout.py, `RolloutMixin`), the
optimizer updates over it (rl_update.py, `RLUpdateMixin`) and, here, the rest: the frozen
models, the iteration (`training_step`) and its metrics, held-out evaluation, optimizer and
checkpoints. The shared config (`RLConfig`) and its start-up check (`check_rl_config`) are in
rl_config.py.

One RL iteration = one `training_step` = one trainer step:

1. generate: `samples_per_prompt` responses to each of `rollout_batch_size` prompts per rank;
2. score: rewards, the policy's ("old") and the reference's log-probs, values (`make_rollout`,
   `score_rollout`: rollout.py); then the stage's `compute_advantages`;
3. update: `ppo_epochs` passes over the rollout in minibatches, one optimizer update each
   (`update`: rl_update.py);

then the rollout/*, train/* and time/* metrics are logged (`rollout_metrics`).

Held-out evaluation (every trainer.eval_every iterations, and at step 0 with algo.eval_at_start):
greedy responses to `algo.eval_prompts` held-out prompts give val/reward, val/kl, ... and, with
the synthetic world's judge, val/gt_score and val/exact, overall and per task kind
(val/gt_score/add, val/exact/add, ...). Each rank evaluates its share; the sums and counts are
reduced over ranks. With algo.eval_hard_prompts > 0, the same on prompts of the world's hard
split (longer numbers), logged apart as val_hard/*.

Frozen models. The reference policy (`ref_model`) and the reward models are used, never
trained nor saved: `ref_model` is set with `object.__setattr__` (`_set_hidden`) so it is not a
submodule (out of the state dict, the optimizer, DDP and FSDP, and Lightning's device moves),
and `_frozen_to_device` moves it and the reward models to the policy's device in the hooks that
use them first (`on_train_start`, `training_step`, `on_validation_epoch_start`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lmforge.algos.base import StageModule, check_vocab, model_config
from lmforge.algos.rl_config import check_rl_config
from lmforge.algos.rl_update import RLUpdateMixin
from lmforge.algos.rollout import (
    Rollout,
    RolloutMixin,
    gt_judge,
    judged_sums,
    response_logits,
    sample_rollout,
    scoring_batch,
    seed_for,
    token_kl,
)
from lmforge.eval.heldout import kind_means
from lmforge.hf.importer import load_any_checkpoint
from lmforge.rewards.reward_function import RewardFunction, build_reward
from lmforge.rl import AdaptiveKLController, FixedKLController, token_rewards
from lmforge.rl.stats import masked_mean
from lmforge.training.checkpoint import POLICY_STAGES, check_compatible, require_stage
from lmforge.training.fault import collapse_warning
from lmforge.training.fsdp import gathered_for_generation
from lmforge.training.tracking import log_text_samples

log = logging.getLogger(__name__)


def distributed_sum():
    """A `reduce` for lmforge.rl.stats (sum over ranks), or None when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():

        def reduce(t: Tensor) -> Tensor:
            t = t.clone()
            torch.distributed.all_reduce(t)
            return t

        return reduce
    return None


# ============================================================================ the module


class RLStageModule(RolloutMixin, RLUpdateMixin, StageModule):
    """The skeleton of an RL stage; subclasses set `stage` and implement `compute_advantages`
    and `loss` (and may extend `policy_forward`, `score_extras`, `extra_state`)."""

    stage = "rl"

    def __init__(self, cfg, tokenizer, reward: RewardFunction):
        super().__init__(cfg, tokenizer)
        # Dropout off everywhere: with it, the log-probs of the rollout and of the update would
        # come from different networks and the ratios would not start at 1.
        if self.model_cfg.dropout:
            log.info("RL: model.dropout=%s is disabled (0.0) for the policy and reference", self.model_cfg.dropout)
        self.model_cfg = replace(self.model_cfg, dropout=0.0)
        self.automatic_optimization = False
        self.model = self.build_causal_lm()
        self.reward = reward
        self.judge = gt_judge(cfg.data)
        algo = cfg.algo
        self.kl_ctl = (
            AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
            if algo.adaptive_kl
            else FixedKLController(algo.kl_coef)
        )
        self.eval_prompts: list = []  # lmforge.data.prompt_data.Prompt, set by build
        self.eval_hard_prompts: list = []  # the same, of the synthetic world's hard split
        self.ptx_data = None  # PromptDataModule when ptx_coef > 0
        self._ptx_iter = None
        self._set_hidden("ref_model", None)
        self._val_sums: dict[str, Tensor] = {}
        self.last_rollout: Rollout | None = None
        self._seq_len = algo.max_prompt_tokens + algo.max_new_tokens

    # -- frozen models: used, never trained nor checkpointed ------------------------------
    def _set_hidden(self, name: str, module) -> None:
        # Not registered as a submodule: it stays out of the state dict (the checkpoint is the
        # policy's), the optimizer, DDP's gradient sync and Lightning's device moves.
        object.__setattr__(self, name, module)

    def init_policy(self, path: str, ref_path: str | None = None) -> None:
        """Policy from an SFT (or pretraining, or earlier RL) checkpoint; the reference is a frozen
        copy of it, or of `ref_path`."""
        self.init_model_from(path, allowed=POLICY_STAGES)
        if ref_path and str(ref_path) != str(path):
            ref = self.build_causal_lm()
            from lmforge.training.checkpoint import load_matching, submodule_state

            ckpt = load_any_checkpoint(ref_path)
            require_stage(ckpt, POLICY_STAGES, "algo.ref_from")
            check_compatible(ckpt, self.model_cfg, "algo.ref_from")
            load_matching(ref, submodule_state(ckpt.state_dict, "model"), f"algo.ref_from={ref_path}")
            self.lineage["ref_from"] = str(ref_path)
        else:
            ref = copy.deepcopy(self.model)
        self._set_hidden("ref_model", ref.eval().requires_grad_(False))
        for i, rm in enumerate(self.reward.reward_models):
            self.lineage["reward_model" if i == 0 else f"reward_model_{i + 1}"] = rm.path

    @torch.no_grad()
    def measure_reward_stats(self, prompts: list) -> dict[str, tuple[float, float]]:
        """Normalize every reward model (normalize: true) by the mean and population std of its raw
        scores of the CURRENT policy's responses to `prompts` (one each, at the sampling
        temperature, a fixed seed: the same on every rank); returns {source: (mean, std)}."""
        algo = self.cfg.algo
        rms = [rm for rm in self.reward.reward_models if rm.normalize]
        raw: dict[str, list[Tensor]] = {rm.name: [] for rm in rms}
        gen = torch.Generator(device=self.device).manual_seed(seed_for(self.cfg.seed, "reward-stats", 0, 0))
        for i in range(0, len(prompts) if rms else 0, algo.eval_batch_size):
            with gathered_for_generation(self.model):
                ro = sample_rollout(
                    self.model,
                    prompts[i : i + algo.eval_batch_size],
                    self.tokenizer,
                    max_new_tokens=algo.max_new_tokens,
                    temperature=algo.temperature,
                    generator=gen,
                )
            for rm in rms:
                raw[rm.name].append(rm.raw_scores(scoring_batch(ro, self.tokenizer)).float().cpu())
        stats = {}
        for rm in rms:
            r = torch.cat(raw[rm.name])
            std = float(r.std(unbiased=False))
            rm.mean, rm.std = float(r.mean()), std if std > 0 else 1.0
            stats[rm.name] = (rm.mean, rm.std)
            log.info(
                "reward %s normalized by the initial policy's samples (%d): mean=%.4g std=%.4g",
                rm.name,
                r.numel(),
                rm.mean,
                rm.std,
            )
        return stats

    def _frozen_to_device(self) -> None:
        if self.ref_model is not None and next(self.ref_model.parameters()).device != self.device:
            self.ref_model.to(self.device)
        self.reward.to(self.device)

    # -- hooks for subclasses --------------------------------------------------------------
    def policy_forward(
        self, sequences: Tensor, attention_mask: Tensor, prompt_len: int, values: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """(response logits (B, N, V), values (B, N) or None) of the trained networks."""
        return response_logits(self.model, sequences, attention_mask, prompt_len)

    def compute_advantages(self, ro: Rollout) -> dict[str, float]:
        raise NotImplementedError

    def loss(self, mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def kl_shaped_rewards(self, ro: Rollout) -> Tensor:
        """Per-token rewards (B, N): the score at the last response token, minus beta * KL to the
        reference on every token (`lmforge.rl.token_rewards`); sets ro.kl, the per-sequence KL."""
        rewards, ro.kl = token_rewards(
            ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, self.kl_ctl.value, self.cfg.algo.kl_estimator
        )
        return rewards

    # -- reductions ------------------------------------------------------------------------
    @property
    def reduce(self):
        return distributed_sum()

    def global_mean(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x.detach().float()
        return masked_mean(x, torch.ones_like(x, dtype=torch.bool) if mask is None else mask, reduce=self.reduce)

    def global_std(self, x: Tensor) -> Tensor:
        from lmforge.rl.stats import masked_var

        x = x.detach().float()
        return masked_var(x, torch.ones_like(x, dtype=torch.bool), unbiased=False, reduce=self.reduce).sqrt()

    # -- the iteration -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self._frozen_to_device()
        step = self.global_step
        ro, times = self.make_rollout(batch, step)
        self.last_rollout = ro  # for inspection (tests, debugging); replaced every iteration
        t2 = time.perf_counter()
        adv_stats = self.compute_advantages(ro)
        # The adaptive KL controller steers towards kl_target with this batch's KL, measured with
        # algo.kl_estimator like the penalty it scales (fixed controller: no-op).
        self.kl_ctl.update(self.global_mean(self.sequence_kl(ro)), n_steps=ro.size * self.trainer.world_size)
        train_stats = self.update(ro, step)
        self._sync()
        times["time/update_s"] = time.perf_counter() - t2
        metrics = {**self.rollout_metrics(ro), **adv_stats, **train_stats, **times}
        metrics["train/kl_coef"] = self.kl_ctl.value
        shown = ("rollout/reward_mean", "rollout/gt_score", "rollout/kl")
        for k, v in metrics.items():
            self.log(k, float(v), prog_bar=k in shown, on_step=True, on_epoch=False)
        collapse_warning(metrics["rollout/entropy"], metrics["rollout/kl"], step=step)
        algo = self.cfg.algo
        if kl_budget_spent(float(metrics["rollout/kl"]), algo.kl_budget):
            log.warning(
                "step %d: rollout/kl=%.3f exceeds algo.kl_budget=%g: stopping the run here",
                step,
                float(metrics["rollout/kl"]),
                algo.kl_budget,
            )
            self.trainer.should_stop = True
        if algo.sample_every > 0 and step % algo.sample_every == 0:
            self.log_rollout_samples(ro, step)

    def rollout_metrics(self, ro: Rollout) -> dict[str, Tensor]:
        metrics = {
            "rollout/reward_mean": self.global_mean(ro.raw_scores),
            "rollout/reward_std": self.global_std(ro.raw_scores),
            "rollout/score_mean": self.global_mean(ro.scores),  # after EOS penalty and clipping
            # KL to the reference in nats per response (sum over its tokens, mean over responses):
            # rollout/kl with algo.kl_estimator (what the penalty and the controller use), and
            # with k1 and k3 named, comparable across runs whatever the setting.
            "rollout/kl": self.global_mean(self.sequence_kl(ro)),
            "rollout/kl_k1": self.global_mean(self.sequence_kl(ro, "k1")),
            "rollout/kl_k3": self.global_mean(self.sequence_kl(ro, "k3")),
            "rollout/entropy": self.global_mean(ro.entropy),
            "rollout/response_len": self.global_mean(ro.lengths().float()),
            "rollout/eos_frac": self.global_mean(ro.ended.float()),
        }
        for name, s in ro.score_parts.items():
            metrics[f"rollout/reward/{name}"] = self.global_mean(s)
        if ro.gt_scores is not None:
            metrics["rollout/gt_score"] = self.global_mean(ro.gt_scores)
        return metrics

    def log_rollout_samples(self, ro: Rollout, step: int) -> None:
        rows = []
        for i in range(min(self.cfg.algo.n_samples, ro.size)):
            row = {
                "step": step,
                "prompt": ro.prompts[i].text,
                "sample": ro.responses[i],
                "reward": round(float(ro.raw_scores[i]), 4),
                "score": round(float(ro.scores[i]), 4),
            }
            if ro.gt_scores is not None:
                row["gt_score"] = round(float(ro.gt_scores[i]), 4)
            rows.append(row)
        log_text_samples(self.trainer, "rollouts", rows)

    # -- held-out evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate_prompts(self, prompts: list) -> tuple[dict[str, Tensor], list[dict]]:
        """Sums over `prompts` of the held-out metrics (greedy by default) and a few examples."""
        algo = self.cfg.algo
        gen = None
        if algo.eval_temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(seed_for(self.cfg.seed, "eval", 0, self.global_rank))
        with gathered_for_generation(self.model):
            ro = sample_rollout(
                self.model,
                prompts,
                self.tokenizer,
                max_new_tokens=algo.eval_max_new_tokens,
                temperature=algo.eval_temperature,
                generator=gen,
            )
            logits, _ = self.policy_forward(ro.sequences, ro.attention_mask, ro.prompt_len, values=False)
        m = ro.response_mask
        ref_logits, _ = response_logits(self.ref_model, ro.sequences, ro.attention_mask, ro.prompt_len)
        kl = token_kl(logits, ref_logits).masked_fill(~m, 0.0).sum(-1)
        reward, _ = self.reward(scoring_batch(ro, self.tokenizer), device=self.device)

        def f(x):
            return x.detach().double().sum()

        sums = {
            "n": torch.tensor(float(ro.size), dtype=torch.float64, device=self.device),
            "kl": f(kl),
            "reward": f(reward),
            "response_len": f(ro.lengths().float()),
            "eos_frac": f(ro.ended.float()),
        }
        examples = [
            {"prompt": p.text, "sample": r, "reward": round(float(s), 4)}
            for p, r, s in zip(ro.prompts, ro.responses, reward)
        ]
        if self.judge is not None:
            sums.update(judged_sums(self.judge, ro, examples, self.device))
        return sums, examples

    def eval_metrics(self, sums: dict[str, Tensor], prefix: str = "val") -> dict[str, float]:
        """{prefix}/* means from sums (reduced over ranks): over all prompts, and per task kind
        over that kind's prompts ("gt_score/add": the sums' keys with a "/")."""
        if self._trainer is not None and self.trainer.world_size > 1:
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        if not sums:
            return {}
        n = max(float(sums["n"]), 1.0)
        metrics = {k: float(v) / n for k, v in sums.items() if k != "n" and "/" not in k}
        metrics.update(kind_means({k: float(v) for k, v in sums.items() if "/" in k}))
        return {f"{prefix}/{k}": v for k, v in metrics.items()}

    def _evaluate_all(self, prompts: list, prefix: str = "val") -> tuple[dict[str, float], list[dict]]:
        """`eval_metrics` of `prompts`, each rank evaluating its share, and this rank's examples."""
        rank, world = self.global_rank, self.trainer.world_size if self._trainer is not None else 1
        mine = prompts[rank::world]
        bs = self.cfg.algo.eval_batch_size
        total: dict[str, Tensor] = {}
        examples: list[dict] = []
        for i in range(0, len(mine), bs):
            sums, ex = self.evaluate_prompts(mine[i : i + bs])
            total = {k: total.get(k, 0) + v for k, v in sums.items()}
            examples += ex
        return self.eval_metrics(total, prefix), examples

    def hard_metrics(self) -> dict[str, float]:
        """val_hard/*: the held-out metrics on the hard split's prompts (empty when there are none)."""
        return self._evaluate_all(self.eval_hard_prompts, "val_hard")[0] if self.eval_hard_prompts else {}

    def on_train_start(self) -> None:
        self._frozen_to_device()
        if self.global_step == 0 and self.cfg.algo.eval_at_start and self.eval_prompts:
            metrics, examples = self._evaluate_all(self.eval_prompts)
            metrics.update(self.hard_metrics())
            log.info(
                "RL start (step 0, the initial policy): %s",
                ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())),
            )
            for lg in self.loggers:
                lg.log_metrics(metrics, step=0)
            log_text_samples(
                self.trainer, "eval_samples", [{"step": 0, **e} for e in examples[: self.cfg.algo.n_samples]]
            )

    def on_validation_epoch_start(self) -> None:
        self._frozen_to_device()
        self._val_sums = {}
        self._val_examples: list[dict] = []

    def validation_step(self, batch, batch_idx):
        sums, examples = self.evaluate_prompts(batch)
        self._val_sums = {k: self._val_sums.get(k, 0) + v for k, v in sums.items()}
        if batch_idx == 0:
            self._val_examples = examples

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        metrics = self.eval_metrics(self._val_sums)
        if not self.trainer.sanity_checking:
            metrics.update(self.hard_metrics())
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k in ("val/gt_score", "val/kl"))
        if not self.trainer.sanity_checking:
            log_text_samples(
                self.trainer,
                "eval_samples",
                [{"step": self.global_step, **e} for e in self._val_examples[: self.cfg.algo.n_samples]],
            )

    # -- optimizer, checkpoints ------------------------------------------------------------
    @property
    def checkpoint_monitor(self) -> tuple[str, str]:
        """What best.ckpt keeps (lmforge.training.trainer reads it): the held-out judge score where there
        is one, else the reward of the greedy held-out responses."""
        return ("val/gt_score", "max") if self.judge is not None else ("val/reward", "max")

    def global_batch_size(self) -> int:
        """Sequences per optimizer update, all ranks together (lmforge.training.strategy.GlobalBatch)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return int(self.cfg.algo.minibatch_size) * world

    def configure_optimizers(self):
        # The policy and whatever else the stage trains (PPO's critic or value head); the frozen
        # reference and reward models are not submodules.
        return self.adamw_with_schedule(self, self.cfg.algo.optim)

    def flops_per_token(self) -> float:
        return self.model.backbone.flops_per_token(self._seq_len)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lmforge_rl"] = {"kl_ctl": self.kl_ctl.state_dict(), **self.extra_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lmforge_rl") or {}
        if "kl_ctl" in state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.load_extra_state(state)


# ============================================================================ building


def kl_budget_spent(kl: float, budget: float) -> bool:
    """Whether a run with `algo.kl_budget=budget` (0 = no budget) stops at this KL."""
    return budget > 0 and kl > budget


def build_rl_stage(cfg, run_dir, module_cls, **module_kwargs):
    """The policy (init_from), its frozen reference, the reward sources and the prompts."""
    from lmforge.data.prompt_data import PromptDataModule

    check_rl_config(cfg)
    algo = cfg.algo
    # Fail fast, before any data work, on a checkpoint of the wrong kind or shape.
    ckpt = load_any_checkpoint(cfg.init_from)
    require_stage(ckpt, POLICY_STAGES, "init_from")
    check_compatible(ckpt, model_config(cfg))
    tokenizer = ckpt.tokenizer
    del ckpt
    check_vocab(tokenizer, cfg)
    reward = build_reward(algo.reward, tokenizer, micro_batch_size=algo.micro_batch_size)
    module = module_cls(cfg, tokenizer, reward, **module_kwargs)
    module.init_policy(cfg.init_from, algo.ref_from)
    dm = PromptDataModule(
        cfg.data,
        tokenizer,
        prompts_per_step=algo.rollout_batch_size,
        max_prompt_tokens=algo.max_prompt_tokens,
        eval_prompts=algo.eval_prompts,
        eval_batch_size=algo.eval_batch_size,
        seed=cfg.seed,
        ptx_batch_size=algo.ptx_batch_size,
        ptx_seq_len=algo.ptx_seq_len,
        eval_hard_prompts=algo.eval_hard_prompts,
    )
    dm.prepare_data()
    module.eval_prompts = dm.eval_prompts
    module.eval_hard_prompts = dm.eval_hard_prompts
    if algo.reward_stats_from == "policy":
        module.measure_reward_stats(dm.train_prompts[: algo.reward_stats_prompts])
    if algo.ptx_coef > 0:
        module.ptx_data = dm
    return module, dm


__all__ = [
    "POLICY_STAGES",
    "RLStageModule",
    "build_rl_stage",
    "distributed_sum",
]
