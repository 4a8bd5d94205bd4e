"""Rollouts: sampling the RL stages' responses and scoring them into a `Rollout`.

`Rollout` holds one iteration's sampled responses and, once scored, their rewards, log-probs,
values and advantages: the experience the update (rl_update.py) trains on. The plain functions
sample one (`sample_rollout`) and score it (`scoring_batch` for the reward sources,
`shape_scores`, `response_logits`, the exact `token_kl`, the per-rank seeds `seed_for`), usable
without a LightningModule; `RolloutMixin` is the part of `RLStageModule` (rl_stage.py) that
makes and scores the rollout of an iteration (`make_rollout`, `score_rollout`) and applies the
sampling temperature and the KL estimator.

Steps 1 and 2 of an RL iteration (rl_stage.py; step 3, the update, is in rl_update.py):

1. generate: `rollout_batch_size` prompts per rank, each sampled `samples_per_prompt` times,
   batched with the KV cache (`lmforge.model.generation`: temperature, stop at EOS;
   prompts of different lengths left-padded in one batch); everything after a row's first EOS
   is masked out;
2. score: the reward sources (reward models, callables; `lmforge.rewards`), the missing-EOS
   penalty and reward clipping; the log-probs of the sampled tokens under the policy (the
   "old" log-probs) and the frozen reference, recomputed from logits divided by the sampling
   temperature; for synthetic data the ground-truth judge score of every response.

Each in one place:

- Temperature. Rollouts sample from softmax(logits / temperature); every log-prob (old,
  reference, new) and the rollout entropy are computed from `tempered(logits)` (through
  `token_logprobs`), so ratios start at exactly 1 and the KL compares the distributions
  sampled. top_k / top_p filters are refused (`check_rl_config`): the log-probs would not be
  those of the filtered sampler. Held-out evaluation is greedy by default (`eval_temperature`).
- KL. One per-token estimator, `algo.kl_estimator`, for the penalty in the reward (PPO,
  REINFORCE, RLOO) or the loss term (GRPO), the adaptive controller, and `rollout/kl`;
  `rollout/kl_k1` and `rollout/kl_k3` are logged by name; `val/kl` is the exact KL of the
  held-out responses' next-token distributions (`token_kl`).

Alignment: the causal LM's output at position t predicts token t+1, so the response tokens at
columns [P, P+N) are scored by the logits at [P-1, P+N-1) (`response_logits`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.eval.heldout import kind_sums
from lmforge.model import generate
from lmforge.rewards.source import ScoringBatch
from lmforge.rl import kl_estimate, logprobs_from_logits, token_entropy
from lmforge.training.fsdp import gathered_for_generation


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


def response_logits(
    model, sequences: Tensor, attention_mask: Tensor, prompt_len: int, value_head: torch.nn.Module | None = None
) -> tuple[Tensor, Tensor | None]:
    """Logits (B, N, V) that score the response tokens sequences[:, P:], and optionally a value
    per response position (B, N) from `value_head` on the same hidden states.

    The hidden state at column t predicts token t+1, so the N response tokens at columns
    [P, P+N) are read from columns [P-1, P+N-1); the value of response step t is the value of
    the state before its token (the same columns)."""
    logits, hidden = model(
        sequences, attention_mask=attention_mask, columns=slice(prompt_len - 1, -1), return_hidden=True
    )
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


def sample_rollout(
    policy,
    prompts: list,
    tokenizer,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    static_cache: bool = False,
) -> Rollout:
    """Sample one response per prompt (batched, left-padded, KV cache), trimmed to the longest
    response, with everything after each row's first EOS masked."""
    out = generate(
        policy,
        [p.ids for p in prompts],
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        static_cache=static_cache,
    )
    P = out.prompt_len
    resp = out.sequences[:, P:]
    mask = out.response_mask & mask_after_eos(resp, tokenizer.eos_id)
    n = max(1, int(mask.sum(-1).max()))
    resp, mask = resp[:, :n], mask[:, :n]
    sequences = out.sequences[:, : P + n].masked_fill(
        torch.cat([~out.attention_mask[:, :P], ~mask], 1), tokenizer.pad_id
    )
    attention_mask = torch.cat([out.attention_mask[:, :P], mask], 1)
    responses = [tokenizer.decode(r[m].tolist()) for r, m in zip(resp, mask)]
    ended = (resp == tokenizer.eos_id).logical_and(mask).any(-1)
    return Rollout(list(prompts), sequences, attention_mask, P, mask, ended, responses)


def scoring_batch(ro: Rollout, tokenizer) -> ScoringBatch:
    resp = ro.response_tokens
    return ScoringBatch(
        prompts=[p.text for p in ro.prompts],
        responses=ro.responses,
        sequences=ro.sequences,
        attention_mask=ro.attention_mask,
        tokenizer=tokenizer,
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
    from lmforge.world.judge import judge_batch

    return judge_batch


def judged_sums(judge, ro: Rollout, examples: list[dict], device) -> dict[str, Tensor]:
    """The held-out sums of the judge's scores of a rollout's responses: "gt_score", "exact" and,
    per task kind, "gt_score/add", "exact/add", "n/add", ... (every kind, so every rank reduces
    the same keys); each example gets its "gt_score"."""
    raw = [p.raw for p in ro.prompts]
    scores = judge(raw, ro.responses)
    gt = torch.tensor(scores, dtype=torch.float64, device=device)
    sums = {"gt_score": gt.sum(), "exact": (gt == 1.0).double().sum()}
    for k, v in kind_sums(raw, scores, "gt_score").items():
        sums[k] = torch.tensor(v, dtype=torch.float64, device=device)
    for ex, g in zip(examples, gt.tolist()):
        ex["gt_score"] = g
    return sums


class RolloutMixin:
    """Makes and scores the rollout of an iteration; a part of `RLStageModule` (rl_stage.py),
    whose `cfg`, `model`, `ref_model`, `reward`, `judge` and `policy_forward` it uses."""

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
            ro = sample_rollout(
                self.model,
                rows,
                self.tokenizer,
                max_new_tokens=algo.max_new_tokens,
                temperature=algo.temperature,
                top_k=algo.top_k,
                top_p=algo.top_p,
                generator=gen,
                static_cache=algo.static_cache,
            )
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
            ro.gt_scores = torch.tensor(
                self.judge([p.raw for p in ro.prompts], ro.responses), dtype=torch.float32, device=self.device
            )
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


__all__ = [
    "Rollout",
    "RolloutMixin",
    "mask_after_eos",
    "response_logits",
    "sample_rollout",
    "seed_for",
    "shape_scores",
    "token_kl",
]
