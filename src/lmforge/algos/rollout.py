"""What the RL stages share: rollouts (sampling, scoring, log-probs), held-out evaluation, and
the LightningModule skeleton of one RL iteration. ppo.py and pg.py (REINFORCE, RLOO, GRPO)
differ only in how they turn a scored rollout into advantages and a loss.

Not a stage itself (no CONFIG): the stage modules import it. The shared config (`RLConfig`) and
its start-up check (`check_rl_config`) are in rl_config.py.

One RL iteration = one `training_step` = one trainer step:

1. generate: `rollout_batch_size` prompts per rank, each sampled `samples_per_prompt` times,
   batched with the KV cache (`lmforge.model.generation`: temperature, stop at EOS;
   prompts of different lengths left-padded in one batch); everything after a row's first EOS
   is masked out;
2. score: the reward sources (reward models, callables; `lmforge.rewards`), the missing-EOS
   penalty and reward clipping; the log-probs of the sampled tokens under the policy (the
   "old" log-probs) and the frozen reference, recomputed from logits divided by the sampling
   temperature; for synthetic data the ground-truth judge score of every response;
3. update: `ppo_epochs` passes over the rollout in shuffled minibatches of `minibatch_size`
   sequences, each one optimizer update accumulated over micro-batches of `micro_batch_size`.

The bookkeeping of an update (`update`), each in one place:

- Loss normalization. Before an update's first micro-batch, `update_norm` counts its real
  response tokens and sequences on every rank (one all-reduce) and divides them by the number
  of ranks, because DDP AVERAGES the ranks' gradients. Each micro-batch's loss is its token (or
  sequence) SUM over those denominators (`lmforge.rl.losses.aggregate`, `algo.loss_agg`), so
  the summed gradients are those of one loss over the whole update: the same for any
  `micro_batch_size` and any number of ranks. The logged train/* figures are built the same
  way: summed over an update's micro-batches, averaged over its updates and ranks.
- Accumulation by hand (manual optimization): backward per micro-batch, DDP's gradient sync
  only at the last one (`opt.toggle_model(sync_grad=...)`), then gradient clipping and one
  optimizer step. Step accounting: trainer.max_steps, eval_every, log_every, the LR schedule and
  resume count RL ITERATIONS, not updates (ppo_epochs * rows / minibatch_size per iteration;
  `train/updates` logs the total). Lightning counts every `LightningOptimizer.step()` as a
  global step, so all but the iteration's last update call `trainer.strategy.optimizer_step(opt,
  closure=lambda: None)` instead (`_optimizer_step`): the same precision plugin and strategy
  step minus the counter; the closure is a no-op because the gradients are already there.
- PPO-ptx (`ptx_coef > 0`): `ptx_coef` x the mean SFT loss of ONE batch of SFT pairs is added
  to the last micro-batch's loss of every update, so it counts once per update whatever the
  split.
- Frozen models. The reference policy (`ref_model`) and the reward models are used, never
  trained nor saved: `ref_model` is set with `object.__setattr__` (`_set_hidden`) so it is not
  a submodule (out of the state dict, the optimizer, DDP and FSDP, and Lightning's device moves),
  and `_frozen_to_device` moves it and the reward models to the policy's device in the hooks
  that use them first (`on_train_start`, `training_step`, `on_validation_epoch_start`).
- Temperature. Rollouts sample from softmax(logits / temperature); every log-prob (old,
  reference, new) and the rollout entropy are computed from `tempered(logits)` (through
  `token_logprobs`), so ratios start at exactly 1 and the KL compares the distributions
  sampled. top_k / top_p filters are refused (`check_rl_config`): the log-probs would not be
  those of the filtered sampler. Held-out evaluation is greedy by default (`eval_temperature`).
- KL. One per-token estimator, `algo.kl_estimator`, for the penalty in the reward (PPO,
  REINFORCE, RLOO) or the loss term (GRPO), the adaptive controller, and `rollout/kl`;
  `rollout/kl_k1` and `rollout/kl_k3` are logged by name; `val/kl` is the exact KL of the
  held-out responses' next-token distributions (`token_kl`).
- On-policy. With `clip_eps: null` (the plain policy gradient, no importance ratio) an
  iteration makes exactly one update (`ppo_epochs: 1`, `minibatch_size` = the rollout's rows).

Alignment: the causal LM's output at position t predicts token t+1, so the response tokens at
columns [P, P+N) are scored by the logits at [P-1, P+N-1) (`response_logits`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.algos.base import StageModule, check_vocab, model_config
from lmforge.algos.rl_config import RLConfig, check_rl_config
from lmforge.hf.importer import load_any_checkpoint
from lmforge.model import generate
from lmforge.rewards.reward_function import RewardFunction, build_reward
from lmforge.rewards.source import ScoringBatch
from lmforge.rl import (
    AdaptiveKLController,
    FixedKLController,
    LossNorm,
    kl_estimate,
    logprobs_from_logits,
    token_entropy,
    token_rewards,
)
from lmforge.rl.stats import masked_mean
from lmforge.training.checkpoint import check_compatible, require_stage
from lmforge.training.fault import collapse_warning
from lmforge.training.fsdp import gathered_for_generation
from lmforge.training.tracking import log_text_samples

log = logging.getLogger(__name__)

# Checkpoint stages a policy may start from: a language model, never a reward model.
POLICY_STAGES = ("pretrain", "sft", "ppo", "reinforce", "rloo", "grpo")


# ============================================================================ tensors


@dataclass
class Rollout:
    """B = prompts * samples_per_prompt responses; token tensors over the N response columns."""

    prompts: list  # lmforge.data.prompt_data.Prompt per row (a prompt's samples are consecutive)
    sequences: Tensor  # (B, P + N) left-padded prompts, then responses (pad after EOS)
    attention_mask: Tensor  # (B, P + N) bool, real tokens (the EOS included)
    prompt_len: int  # P
    response_mask: Tensor  # (B, N) bool, response tokens up to and including the first EOS
    ended: Tensor  # (B,) bool: the response ended with EOS
    responses: list[str]
    logprobs: Tensor | None = None  # (B, N) old policy, at the sampling temperature; 0 off the mask
    ref_logprobs: Tensor | None = None  # (B, N) reference, same temperature
    values: Tensor | None = None  # (B, N) critic (PPO)
    entropy: Tensor | None = None  # scalar, masked token mean
    raw_scores: Tensor | None = None  # (B,) the weighted reward sources
    scores: Tensor | None = None  # (B,) after the missing-EOS penalty and clipping
    score_parts: dict[str, Tensor] = field(default_factory=dict)
    gt_scores: Tensor | None = None  # (B,) ground-truth judge (synthetic data)
    advantages: Tensor | None = None  # (B, N) or (B,)
    returns: Tensor | None = None  # (B, N) critic targets (PPO)
    kl: Tensor | None = None  # (B, N) per-token KL estimate to the reference

    @property
    def size(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_tokens(self) -> Tensor:
        return self.sequences[:, self.prompt_len :]

    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)


def mask_after_eos(tokens: Tensor, eos_id: int) -> Tensor:
    """(B, N) response tokens -> bool mask, True up to and including each row's first EOS."""
    is_eos = tokens == eos_id
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before t
    return eos_before == 0


def response_logits(model, sequences: Tensor, attention_mask: Tensor, prompt_len: int,
                    value_head: torch.nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits (B, N, V) that score the response tokens sequences[:, P:], and optionally a value
    per response position (B, N) from `value_head` on the same hidden states.

    The hidden state at column t predicts token t+1, so the N response tokens at columns
    [P, P+N) are read from columns [P-1, P+N-1); the value of response step t is the value of
    the state before its token (the same columns)."""
    logits, hidden = model(sequences, attention_mask=attention_mask, columns=slice(prompt_len - 1, -1),
                           return_hidden=True)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
    return logits, values


def token_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Exact KL(p || q) of the next-token distributions at every position, (B, N)."""
    lp, lq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def seed_for(seed: int, stream: str, step: int, rank: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, purpose, iteration, rank)."""
    digest = hashlib.sha256(f"lmforge-rl/{seed}/{stream}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def distributed_sum():
    """A `reduce` for lmforge.rl.stats (sum over ranks), or None when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        def reduce(t: Tensor) -> Tensor:
            t = t.clone()
            torch.distributed.all_reduce(t)
            return t
        return reduce
    return None


def sample_rollout(policy, prompts: list, tokenizer, *, max_new_tokens: int, temperature: float,
                   top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, static_cache: bool = False) -> Rollout:
    """Sample one response per prompt (batched, left-padded, KV cache), trimmed to the longest
    response, with everything after each row's first EOS masked."""
    out = generate(policy, [p.ids for p in prompts], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                   static_cache=static_cache)
    P = out.prompt_len
    resp = out.sequences[:, P:]
    mask = out.response_mask & mask_after_eos(resp, tokenizer.eos_id)
    n = max(1, int(mask.sum(-1).max()))
    resp, mask = resp[:, :n], mask[:, :n]
    sequences = out.sequences[:, : P + n].masked_fill(torch.cat([~out.attention_mask[:, :P], ~mask], 1),
                                                      tokenizer.pad_id)
    attention_mask = torch.cat([out.attention_mask[:, :P], mask], 1)
    responses = [tokenizer.decode(r[m].tolist()) for r, m in zip(resp, mask)]
    ended = (resp == tokenizer.eos_id).logical_and(mask).any(-1)
    return Rollout(list(prompts), sequences, attention_mask, P, mask, ended, responses)


def scoring_batch(ro: Rollout, tokenizer) -> ScoringBatch:
    resp = ro.response_tokens
    return ScoringBatch(
        prompts=[p.text for p in ro.prompts], responses=ro.responses, sequences=ro.sequences,
        attention_mask=ro.attention_mask, tokenizer=tokenizer,
        response_ids=[r[m].tolist() for r, m in zip(resp, ro.response_mask)],
    )


def shape_scores(raw: Tensor, ended: Tensor, missing_eos_penalty: float, reward_clip: float) -> Tensor:
    """The score an RL step optimizes: raw reward, minus the penalty for a response the length
    limit cut off (no EOS), clipped to [-reward_clip, reward_clip] when reward_clip > 0."""
    scores = raw - missing_eos_penalty * (~ended).to(raw.dtype)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def gt_judge(data_cfg):
    """The ground-truth judge (raw prompts, responses) -> scores for synthetic data, else None."""
    if data_cfg.source != "synthetic":
        return None
    from lmforge.world.synthetic import judge_batch

    return judge_batch


# ============================================================================ the module


class RLStageModule(StageModule):
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
        self.kl_ctl = (AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon) if algo.adaptive_kl
                       else FixedKLController(algo.kl_coef))
        self.eval_prompts: list = []  # lmforge.data.prompt_data.Prompt, set by build
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
                ro = sample_rollout(self.model, prompts[i : i + algo.eval_batch_size], self.tokenizer,
                                    max_new_tokens=algo.max_new_tokens, temperature=algo.temperature, generator=gen)
            for rm in rms:
                raw[rm.name].append(rm.raw_scores(scoring_batch(ro, self.tokenizer)).float().cpu())
        stats = {}
        for rm in rms:
            r = torch.cat(raw[rm.name])
            std = float(r.std(unbiased=False))
            rm.mean, rm.std = float(r.mean()), std if std > 0 else 1.0
            stats[rm.name] = (rm.mean, rm.std)
            log.info("reward %s normalized by the initial policy's samples (%d): mean=%.4g std=%.4g", rm.name,
                     r.numel(), rm.mean, rm.std)
        return stats

    def _frozen_to_device(self) -> None:
        if self.ref_model is not None and next(self.ref_model.parameters()).device != self.device:
            self.ref_model.to(self.device)
        self.reward.to(self.device)

    # -- the sampling temperature: the one place log-probs and entropies apply it -----------
    def tempered(self, logits: Tensor) -> Tensor:
        """Logits of the distribution the rollout sampled from: softmax(logits / temperature)."""
        return logits.float() / self.cfg.algo.temperature

    def token_logprobs(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Log-probs of `tokens` at the sampling temperature: old, reference and new alike, so
        ratios start at 1 and the KL compares the distributions that were sampled."""
        return logprobs_from_logits(self.tempered(logits), tokens)

    # -- KL to the reference: one estimator (algo.kl_estimator) for penalty, controller, logs
    def token_kl_estimate(self, ro: Rollout, kind: str | None = None) -> Tensor:
        """(B, N) per-token estimate (k1, k2 or k3; default algo.kl_estimator), 0 off the mask."""
        kind = kind or self.cfg.algo.kl_estimator
        return torch.where(ro.response_mask, kl_estimate(ro.logprobs, ro.ref_logprobs, kind), 0.0)

    def sequence_kl(self, ro: Rollout, kind: str | None = None) -> Tensor:
        """(B,) per-response KL estimate: the sum over its tokens (nats per sequence)."""
        return self.token_kl_estimate(ro, kind).sum(-1)

    # -- loss denominators ---------------------------------------------------------------------
    @property
    def loss_agg_const(self) -> float:
        a = self.cfg.algo
        return float(a.loss_agg_const or a.max_new_tokens)

    def update_norm(self, response_mask: Tensor) -> LossNorm:
        """The denominators of one optimizer update whose rows (on this rank) have `response_mask`:
        real tokens and sequences summed over ranks (one all-reduce), divided by the number of
        ranks because DDP AVERAGES the ranks' gradients. Each micro-batch's loss is then its
        share of the update's loss, whatever the micro-batch split and the number of ranks."""
        counts = torch.tensor([float(response_mask.sum()), float(response_mask.shape[0])], dtype=torch.float64,
                              device=self.device)
        world = 1
        if self.reduce is not None:
            counts = self.reduce(counts)
            world = torch.distributed.get_world_size()
        n_tokens, n_seqs = (counts / world).tolist()
        return LossNorm(n_tokens=n_tokens, n_seqs=n_seqs, const=self.loss_agg_const)

    def norm_of(self, mb: dict) -> LossNorm:
        """mb's update denominators (set by `update`); a lone batch is a whole update."""
        return mb.get("norm") or LossNorm(const=self.loss_agg_const)

    # -- hooks for subclasses --------------------------------------------------------------
    def policy_forward(self, sequences: Tensor, attention_mask: Tensor, prompt_len: int,
                       values: bool = True) -> tuple[Tensor, Tensor | None]:
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
        rewards, ro.kl = token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask,
                                       self.kl_ctl.value, self.cfg.algo.kl_estimator)
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

    # -- 1. and 2.: a scored rollout ---------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def make_rollout(self, prompts: list, step: int) -> tuple[Rollout, dict[str, float]]:
        algo = self.cfg.algo
        rows = [p for p in prompts for _ in range(algo.samples_per_prompt)]
        gen = torch.Generator(device=self.device).manual_seed(seed_for(self.cfg.seed, "sample", step, self.global_rank))
        t0 = time.perf_counter()
        with gathered_for_generation(self.model):
            ro = sample_rollout(self.model, rows, self.tokenizer, max_new_tokens=algo.max_new_tokens,
                                temperature=algo.temperature, top_k=algo.top_k, top_p=algo.top_p, generator=gen,
                                static_cache=algo.static_cache)
        self._sync()
        t1 = time.perf_counter()
        self.score_rollout(ro)
        self._sync()
        t2 = time.perf_counter()
        return ro, {"time/generate_s": t1 - t0, "time/score_s": t2 - t1}

    @torch.no_grad()
    def score_rollout(self, ro: Rollout) -> None:
        """Rewards, old and reference log-probs (at the sampling temperature), values, judge."""
        algo = self.cfg.algo
        raw, parts = self.reward(scoring_batch(ro, self.tokenizer), device=self.device)
        ro.raw_scores, ro.score_parts = raw, parts
        ro.scores = shape_scores(raw, ro.ended, algo.missing_eos_penalty, algo.reward_clip)
        if self.judge is not None:
            ro.gt_scores = torch.tensor(self.judge([p.raw for p in ro.prompts], ro.responses),
                                        dtype=torch.float32, device=self.device)
        logps, ref_logps, values, ent_sum, ent_n = [], [], [], 0.0, 0.0
        tokens = ro.response_tokens
        for i in range(0, ro.size, algo.micro_batch_size):
            sl = slice(i, i + algo.micro_batch_size)
            seq, attn, tok, m = ro.sequences[sl], ro.attention_mask[sl], tokens[sl], ro.response_mask[sl]
            logits, v = self.policy_forward(seq, attn, ro.prompt_len)
            logps.append(self.token_logprobs(logits, tok).masked_fill(~m, 0.0))
            ent_sum += float(torch.where(m, token_entropy(self.tempered(logits)), 0.0).sum())
            ent_n += float(m.sum())
            if v is not None:
                values.append(v.masked_fill(~m, 0.0))
            ref_logits, _ = response_logits(self.ref_model, seq, attn, ro.prompt_len)
            ref_logps.append(self.token_logprobs(ref_logits, tok).masked_fill(~m, 0.0))
        ro.logprobs, ro.ref_logprobs = torch.cat(logps), torch.cat(ref_logps)
        ro.values = torch.cat(values) if values else None
        ro.entropy = torch.tensor(ent_sum / max(ent_n, 1.0), device=self.device)

    # -- 3. the update -----------------------------------------------------------------------
    def minibatch_fields(self, ro: Rollout) -> dict[str, Tensor]:
        """Per-row tensors the loss reads, indexed by minibatch rows."""
        f = {"sequences": ro.sequences, "attention_mask": ro.attention_mask, "response_mask": ro.response_mask,
             "old_logprobs": ro.logprobs, "ref_logprobs": ro.ref_logprobs, "advantages": ro.advantages}
        if ro.returns is not None:
            f["returns"] = ro.returns
        if ro.values is not None:
            f["old_values"] = ro.values
        return f

    @staticmethod
    def take(fields: dict[str, Tensor], idx: Tensor, prompt_len: int) -> dict[str, Tensor]:
        """Rows idx of every field, trimmed to the longest response among them."""
        mb = {k: v[idx] for k, v in fields.items()}
        n = max(1, int(mb["response_mask"].sum(-1).max()))
        for k, v in mb.items():
            if k in ("sequences", "attention_mask"):
                mb[k] = v[:, : prompt_len + n]
            elif v.dim() == 2:
                mb[k] = v[:, :n]
        mb["prompt_len"] = prompt_len
        return mb

    def _optimizer_step(self, opt, counted: bool) -> None:
        if counted:
            opt.step()  # Lightning's global_step += 1: once per iteration
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)

    def _ptx_loss(self) -> Tensor:
        from lmforge.data.sft_data import IGNORE_INDEX

        if self._ptx_iter is None:
            # One ptx batch per optimizer update: a resumed run reads on where it stopped.
            a = self.cfg.algo
            updates = a.ppo_epochs * (a.rollout_batch_size * a.samples_per_prompt // a.minibatch_size)
            self._ptx_iter = self.ptx_data.ptx_batches(self.global_rank, self.trainer.world_size,
                                                       self.global_step * updates)
        batch = {k: v.to(self.device) for k, v in next(self._ptx_iter).items()}
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)

    def update(self, ro: Rollout, step: int) -> dict[str, Tensor]:
        algo = self.cfg.algo
        opt = self.optimizers()
        fields = self.minibatch_fields(ro)
        B = ro.size
        n_mb = B // algo.minibatch_size
        n_updates = algo.ppo_epochs * n_mb
        shuffle = torch.Generator().manual_seed(seed_for(self.cfg.seed, "shuffle", step, self.global_rank))
        # Every stat a loss returns is its micro-batch's SHARE of the update's figure (same
        # denominators as the loss): summed over an update's micro-batches, averaged over updates.
        sums: dict[str, Tensor] = {}
        update = 0
        for _ in range(algo.ppo_epochs):
            perm = torch.randperm(B, generator=shuffle).to(self.device)
            for j in range(n_mb):
                rows = perm[j * algo.minibatch_size : (j + 1) * algo.minibatch_size]
                norm = self.update_norm(ro.response_mask[rows])
                micro = rows.split(algo.micro_batch_size)
                for k, idx in enumerate(micro):
                    mb = self.take(fields, idx, ro.prompt_len)
                    mb["norm"] = norm
                    last = k == len(micro) - 1
                    # Gradients are all-reduced (DDP) once per update, at its last micro-batch.
                    with opt.toggle_model(sync_grad=last):
                        loss, stats = self.loss(mb)  # this micro-batch's share of the update's loss
                        if last and algo.ptx_coef > 0:
                            # PPO-ptx: one SFT batch per update, its mean loss added once.
                            ptx = self._ptx_loss()
                            loss = loss + algo.ptx_coef * ptx
                            stats = {**stats, "ptx_loss": ptx.detach()}
                        self.manual_backward(loss)
                    self.count_tokens(int(mb["attention_mask"].sum()))
                    for name, v in stats.items():
                        sums[name] = sums.get(name, 0.0) + v.detach().float()
                if algo.optim.grad_clip > 0:
                    self.clip_gradients(opt, gradient_clip_val=algo.optim.grad_clip, gradient_clip_algorithm="norm")
                update += 1
                self._optimizer_step(opt, counted=update == n_updates)
                opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        world = self.trainer.world_size
        out = {}
        for name, v in sums.items():
            mean = v / n_updates
            if self.reduce is not None:
                mean = self.reduce(mean) / world
            out[f"train/{name}"] = mean
        out["train/updates"] = torch.tensor(float(n_updates * (step + 1)))
        return out

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
            row = {"step": step, "prompt": ro.prompts[i].text, "sample": ro.responses[i],
                   "reward": round(float(ro.raw_scores[i]), 4), "score": round(float(ro.scores[i]), 4)}
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
            ro = sample_rollout(self.model, prompts, self.tokenizer, max_new_tokens=algo.eval_max_new_tokens,
                                temperature=algo.eval_temperature, generator=gen)
            logits, _ = self.policy_forward(ro.sequences, ro.attention_mask, ro.prompt_len, values=False)
        m = ro.response_mask
        ref_logits, _ = response_logits(self.ref_model, ro.sequences, ro.attention_mask, ro.prompt_len)
        kl = token_kl(logits, ref_logits).masked_fill(~m, 0.0).sum(-1)
        reward, _ = self.reward(scoring_batch(ro, self.tokenizer), device=self.device)
        f = lambda x: x.detach().double().sum()
        sums = {"n": torch.tensor(float(ro.size), dtype=torch.float64, device=self.device), "kl": f(kl),
                "reward": f(reward), "response_len": f(ro.lengths().float()), "eos_frac": f(ro.ended.float())}
        examples = [{"prompt": p.text, "sample": r, "reward": round(float(s), 4)}
                    for p, r, s in zip(ro.prompts, ro.responses, reward)]
        if self.judge is not None:
            gt = torch.tensor(self.judge([p.raw for p in ro.prompts], ro.responses), dtype=torch.float64,
                              device=self.device)
            sums["gt_score"], sums["exact"] = gt.sum(), (gt == 1.0).double().sum()
            for ex, g in zip(examples, gt.tolist()):
                ex["gt_score"] = g
        return sums, examples

    def eval_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """val/* means from sums (reduced over ranks)."""
        if self.trainer is not None and self.trainer.world_size > 1:
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        if not sums:
            return {}
        n = max(float(sums["n"]), 1.0)
        return {f"val/{k}": float(v) / n for k, v in sums.items() if k != "n"}

    def _evaluate_all(self) -> tuple[dict[str, float], list[dict]]:
        rank, world = self.global_rank, self.trainer.world_size if self.trainer is not None else 1
        mine = self.eval_prompts[rank::world]
        bs = self.cfg.algo.eval_batch_size
        total: dict[str, Tensor] = {}
        examples: list[dict] = []
        for i in range(0, len(mine), bs):
            sums, ex = self.evaluate_prompts(mine[i : i + bs])
            total = {k: total.get(k, 0) + v for k, v in sums.items()}
            examples += ex
        return self.eval_metrics(total), examples

    def on_train_start(self) -> None:
        self._frozen_to_device()
        if self.global_step == 0 and self.cfg.algo.eval_at_start and self.eval_prompts:
            metrics, examples = self._evaluate_all()
            log.info("RL start (step 0, the initial policy): %s",
                     ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
            for lg in self.loggers:
                lg.log_metrics(metrics, step=0)
            log_text_samples(self.trainer, "eval_samples",
                             [{"step": 0, **e} for e in examples[: self.cfg.algo.n_samples]])

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
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k in ("val/gt_score", "val/kl"))
        if not self.trainer.sanity_checking:
            log_text_samples(self.trainer, "eval_samples",
                             [{"step": self.global_step, **e} for e in self._val_examples[: self.cfg.algo.n_samples]])

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
    dm = PromptDataModule(cfg.data, tokenizer, prompts_per_step=algo.rollout_batch_size,
                          max_prompt_tokens=algo.max_prompt_tokens, eval_prompts=algo.eval_prompts,
                          eval_batch_size=algo.eval_batch_size, seed=cfg.seed,
                          ptx_batch_size=algo.ptx_batch_size, ptx_seq_len=algo.ptx_seq_len)
    dm.prepare_data()
    module.eval_prompts = dm.eval_prompts
    if algo.reward_stats_from == "policy":
        module.measure_reward_stats(dm.train_prompts[: algo.reward_stats_prompts])
    if algo.ptx_coef > 0:
        module.ptx_data = dm
    return module, dm


__all__ = [
    "POLICY_STAGES",
    "RLConfig",
    "RLStageModule",
    "Rollout",
    "build_rl_stage",
    "check_rl_config",
    "distributed_sum",
    "mask_after_eos",
    "response_logits",
    "sample_rollout",
    "seed_for",
    "shape_scores",
    "token_kl",
]

