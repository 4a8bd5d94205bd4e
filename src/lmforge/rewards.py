"""Reward sources for the RL stages (algo.reward): reward models, Python callables, weighted sums.

A reward source maps a batch of (prompt, response) to one score per response. Two kinds:

* a reward-model checkpoint (a `reward` stage: ScalarModel, `model.backbone.*` + `model.head.*`),
  read at the last real token of prompt + response (+ EOS when the response ended), and
  normalized with the checkpoint's stored `reward_stats` as (r - mean) / std, so a reward of 0
  means "as good as the average reward-model training response" and 1 is one standard deviation
  better -- the scale PPO's KL coefficient and clipping are tuned for (Ziegler et al. 2019);
* any Python callable `(prompts: list[str], responses: list[str]) -> list[float]` named by
  `_target_` (a function, or a class instantiated with `args`), e.g. the synthetic world's
  ground-truth judge `lmforge.data.synthetic.ground_truth_reward`.

The config (typed, `algo.reward`)::

    reward:
      model: outputs/.../reward/checkpoints/last.ckpt   # shorthand: one reward model, weight 1
      sources:                                           # more sources, added with weights
        - {ckpt: other_rm.ckpt, weight: 0.5, normalize: true}
        - {_target_: lmforge.data.synthetic.ground_truth_reward, weight: 0.5}
        - {_target_: my.module.LengthPenalty, args: {per_char: 0.01}, weight: 1.0, name: length}

The total reward is sum_i weight_i * source_i; every source's mean is logged separately
(`rollout/reward/<name>`). Prompts passed to callables are the rendered prompts the policy saw
(data.prompt_template applied); responses are the decoded response texts without EOS/padding.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

import torch
from torch import Tensor

from lmforge.checkpoint import (
    CheckpointError,
    StageCheckpoint,
    load_checkpoint,
    load_matching,
    require_stage,
    submodule_state,
)
from lmforge.model import ScalarModel, gather_last

log = logging.getLogger(__name__)


class RewardConfigError(ValueError):
    """An algo.reward entry that cannot be turned into a reward source, with what to change."""


# ----------------------------------------------------------------------------- config


@dataclass
class RewardSourceConfig:
    # Exactly one of `ckpt` (a reward-model checkpoint) and `_target_` (a dotted Python name).
    ckpt: Optional[str] = None
    _target_: Optional[str] = None
    # Keyword arguments: a class `_target_` is instantiated with them, a function gets them bound.
    args: Dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    # Reward models only: (r - mean) / std with the checkpoint's reward_stats.
    normalize: bool = True
    # The name its metrics are logged under (rollout/reward/<name>); default from the source.
    name: Optional[str] = None


@dataclass
class RLRewardConfig:
    # Shorthand for `sources: [{ckpt: <model>}]`, the usual RLHF setup; combined with `sources`.
    model: Optional[str] = None
    sources: List[RewardSourceConfig] = field(default_factory=list)


# ----------------------------------------------------------------------------- what sources read


@dataclass
class ScoringBatch:
    """What a reward source may read about B responses. Token tensors are the policy's: the
    rollout's left-padded prompts followed by the responses; `attention_mask` marks real tokens
    (the response's EOS included, what follows it excluded)."""

    prompts: list[str]  # rendered prompt texts
    responses: list[str]  # decoded response texts (no EOS, no padding)
    sequences: Optional[Tensor] = None  # (B, T) long
    attention_mask: Optional[Tensor] = None  # (B, T) bool
    tokenizer: Any = None  # the tokenizer of `sequences`
    response_ids: Optional[list[list[int]]] = None  # each response's tokens (EOS included if it ended)

    def __len__(self) -> int:
        return len(self.prompts)


class RewardSource(Protocol):
    name: str

    def __call__(self, batch: ScoringBatch) -> Tensor:  # (B,) float32
        ...


# ----------------------------------------------------------------------------- reward models


def _reward_stats(ckpt: StageCheckpoint) -> tuple[float, float]:
    stats = ckpt.meta.get("reward_stats") or {}
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{ckpt.path}: the reward checkpoint stores no reward_stats {{mean, std}} to normalize its "
            "rewards with; re-save it with a current reward stage, or set normalize: false on this "
            "reward source (raw rewards, whose scale the KL coefficient was not tuned for)"
        ) from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise CheckpointError(f"{ckpt.path}: reward_stats mean={mean}, std={std} cannot normalize (std must be > 0)")
    return mean, std


def load_reward_model(path: str | Path, what: str = "reward model") -> tuple[ScalarModel, StageCheckpoint]:
    """A frozen ScalarModel (eval mode, no dropout, no grad) from a `reward` stage checkpoint."""
    ckpt = load_checkpoint(path)
    require_stage(ckpt, ("reward",), what)
    model = ScalarModel(replace(ckpt.model_config, dropout=0.0))
    load_matching(model, submodule_state(ckpt.state_dict, "model"), f"{what}={path}")
    model.eval().requires_grad_(False)
    return model, ckpt


class RewardModelSource:
    """A reward model scoring prompt + response, optionally normalized by its reward_stats."""

    def __init__(self, path: str | Path, *, tokenizer=None, normalize: bool = True, name: str | None = None,
                 micro_batch_size: int = 32):
        self.path = str(path)
        self.model, ckpt = load_reward_model(path, what=f"algo.reward ckpt {name or ''}".strip())
        self.tokenizer = ckpt.tokenizer
        self.mean, self.std = _reward_stats(ckpt) if normalize else (0.0, 1.0)
        self.normalize = normalize
        self.name = name or "rm"
        self.micro_batch_size = micro_batch_size
        # Same tokenizer as the policy: score the rollout's tokens as they are (no re-encoding);
        # otherwise re-encode the texts with the reward model's own tokenizer.
        self.reads_policy_tokens = tokenizer is not None and tokenizer.proto() == ckpt.tokenizer.proto()
        self.meta = ckpt.meta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> RewardModelSource:
        self.model.to(device)
        return self

    def _encode_texts(self, batch: ScoringBatch) -> tuple[Tensor, Tensor]:
        """Right-padded prompt + response + EOS with the reward model's tokenizer (cut from the
        left of the prompt when too long, as the reward stage encodes pairs)."""
        tok, limit = self.tokenizer, self.model.cfg.max_seq_len
        rows = []
        for p, r in zip(batch.prompts, batch.responses):
            resp = (tok.encode(r) + [tok.eos_id])[: limit - 1]
            rows.append((tok.encode(p) + resp)[-limit:])
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask

    @torch.no_grad()
    def raw_scores(self, batch: ScoringBatch) -> Tensor:
        if self.reads_policy_tokens and batch.sequences is not None:
            ids, mask = batch.sequences, batch.attention_mask
        else:
            ids, mask = self._encode_texts(batch)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = []
        for i in range(0, ids.shape[0], self.micro_batch_size):
            m = mask[i : i + self.micro_batch_size]
            values = self.model(ids[i : i + self.micro_batch_size], attention_mask=m)
            out.append(gather_last(values, m).float())
        return torch.cat(out)

    def __call__(self, batch: ScoringBatch) -> Tensor:
        return (self.raw_scores(batch) - self.mean) / self.std


# ----------------------------------------------------------------------------- callables


def resolve_callable(target: str, args: dict | None = None) -> Callable:
    """The callable a dotted `_target_` names: a function (args bound with functools.partial) or
    a class (instantiated with args; the instance must be callable)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - any import error becomes one clear message
        raise RewardConfigError(
            f"algo.reward: cannot import _target_={target!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "give the full dotted path of a function or class, e.g. lmforge.data.synthetic.ground_truth_reward"
        ) from None
    args = dict(args or {})
    if isinstance(obj, type):
        obj = obj(**args)
    elif args:
        obj = functools.partial(obj, **args)
    if not callable(obj):
        raise RewardConfigError(f"algo.reward: _target_={target!r} is not callable")
    return obj


class CallableSource:
    """A Python callable (prompts, responses) -> scores as a reward source."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], name: str | None = None):
        self.fn = fn
        base = getattr(fn, "func", fn)  # functools.partial
        self.name = name or getattr(base, "__name__", type(base).__name__)

    def __call__(self, batch: ScoringBatch) -> Tensor:
        out = self.fn(list(batch.prompts), list(batch.responses))
        try:
            scores = torch.as_tensor(out, dtype=torch.float32).flatten().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise RewardConfigError(
                f"reward source {self.name!r} returned {type(out).__name__} {str(out)[:100]!r}, not numbers: a reward "
                "callable must return one number per (prompt, response)"
            ) from None
        if scores.numel() != len(batch):
            raise RewardConfigError(
                f"reward source {self.name!r} returned {scores.numel()} scores for {len(batch)} responses: "
                "a reward callable must return one number per (prompt, response)"
            )
        if not torch.isfinite(scores).all():
            raise RewardConfigError(f"reward source {self.name!r} returned a non-finite score: {scores.tolist()}")
        return scores


# ----------------------------------------------------------------------------- the sum


class RewardFunction:
    """sum_i weight_i * source_i(batch); returns the total and each source's own (unweighted) scores."""

    def __init__(self, sources: list[tuple[RewardSource, float]]):
        if not sources:
            raise RewardConfigError("a reward needs at least one source")
        names = [s.name for s, _ in sources]
        if len(set(names)) != len(names):
            raise RewardConfigError(f"reward source names must be unique, got {names}: set `name:` on the sources")
        self.sources = sources

    @property
    def reward_models(self) -> list[RewardModelSource]:
        return [s for s, _ in self.sources if isinstance(s, RewardModelSource)]

    def to(self, device) -> RewardFunction:
        for rm in self.reward_models:
            rm.to(device)
        return self

    def __call__(self, batch: ScoringBatch, device=None) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = None
        for source, weight in self.sources:
            s = source(batch).float()
            s = s.to(device) if device is not None else s
            parts[source.name] = s
            total = weight * s if total is None else total + weight * s
        return total, parts


def _source_configs(cfg) -> list[dict]:
    entries = []
    if cfg.get("model"):
        entries.append({"ckpt": str(cfg.get("model")), "weight": 1.0, "normalize": True, "name": None, "args": {}})
    for i, s in enumerate(cfg.get("sources") or []):
        s = {k: s[k] for k in s}
        entries.append({"ckpt": s.get("ckpt"), "_target_": s.get("_target_"), "args": dict(s.get("args") or {}),
                        "weight": float(s.get("weight", 1.0)), "normalize": bool(s.get("normalize", True)),
                        "name": s.get("name"), "index": i})
    return entries


def build_reward(cfg, tokenizer=None, micro_batch_size: int = 32) -> RewardFunction:
    """The RewardFunction an `algo.reward` config (RLRewardConfig or an equivalent dict) describes."""
    entries = _source_configs(cfg)
    if not entries:
        raise RewardConfigError(
            "algo.reward has no source: set algo.reward.model=<a reward-model checkpoint>, or list "
            "sources, e.g. 'algo.reward.sources=[{_target_:lmforge.data.synthetic.ground_truth_reward}]'"
        )
    sources: list[tuple[RewardSource, float]] = []
    n_rm = sum(1 for e in entries if e.get("ckpt"))
    k_rm = 0
    for e in entries:
        where = "algo.reward.model" if "index" not in e else f"algo.reward.sources[{e['index']}]"
        if bool(e.get("ckpt")) == bool(e.get("_target_")):
            raise RewardConfigError(f"{where}: give exactly one of `ckpt` (a reward model) and `_target_` (a callable)")
        if not math.isfinite(e["weight"]):
            raise RewardConfigError(f"{where}: weight={e['weight']} must be a finite number")
        if e.get("ckpt"):
            k_rm += 1
            name = e["name"] or ("rm" if n_rm == 1 else f"rm_{k_rm}")
            source: RewardSource = RewardModelSource(e["ckpt"], tokenizer=tokenizer, normalize=e["normalize"],
                                                     name=name, micro_batch_size=micro_batch_size)
        else:
            source = CallableSource(resolve_callable(e["_target_"], e["args"]), name=e["name"])
        sources.append((source, e["weight"]))
    return RewardFunction(sources)


def normalized_head(rm: RewardModelSource) -> tuple[Tensor, Tensor]:
    """The reward model's head with its normalization folded in: w / std, (b - mean) / std, so a
    critic initialized from it starts by predicting the normalized reward PPO optimizes."""
    head = rm.model.head
    return head.weight.detach() / rm.std, (head.bias.detach() - rm.mean) / rm.std


__all__ = [
    "CallableSource",
    "RLRewardConfig",
    "RewardConfigError",
    "RewardFunction",
    "RewardModelSource",
    "RewardSourceConfig",
    "ScoringBatch",
    "build_reward",
    "load_reward_model",
    "normalized_head",
    "resolve_callable",
]
