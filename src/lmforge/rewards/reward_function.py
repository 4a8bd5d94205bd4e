"""The reward of the RL stages (algo.reward): reward models, Python callables, weighted sums.

A reward source maps a batch of (prompt, response) to one score per response. Two kinds:

* a reward-model checkpoint (a `reward` stage: ScalarModel, `model.backbone.*` + `model.head.*`),
  read at the last real token of prompt + response (+ EOS when the response ended), and
  normalized with the checkpoint's stored `reward_stats` as (r - mean) / std, so a reward of 0
  means "as good as the average reward-model training response" and 1 is one standard deviation
  better -- the scale PPO's KL coefficient and clipping are tuned for (Ziegler et al. 2019);
* any Python callable `(prompts: list[str], responses: list[str]) -> list[float]` named by
  `_target_` (a function, or a class instantiated with `args`), e.g. the synthetic world's
  ground-truth judge `lmforge.world.judge.ground_truth_reward`.

The config (typed, `algo.reward`)::

    reward:
      model: outputs/.../reward/checkpoints/last.ckpt   # shorthand: one reward model, weight 1
      sources:                                           # more sources, added with weights
        - {ckpt: other_rm.ckpt, weight: 0.5, normalize: true}
        - {_target_: lmforge.world.judge.ground_truth_reward, weight: 0.5}
        - {_target_: my.module.LengthPenalty, args: {per_char: 0.01}, weight: 1.0, name: length}

The total reward is sum_i weight_i * source_i; every source's mean is logged separately
(`rollout/reward/<name>`). With `ensemble: mean | uwo | wco` the reward models among the
sources are an ensemble instead: their scores combine into one term (lmforge.rl.ensemble; uwo =
mean - ensemble_lambda * std over the models, the conservative reward of Coste et al., 2023),
logged as `rollout/reward/ensemble` with the models' disagreement as `rollout/reward/ensemble_std`;
callables are still added with their weights. Prompts passed to callables are the rendered prompts the policy saw
(data.prompt_template applied); responses are the decoded response texts without EOS/padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from lmforge.rewards.reward_model import RewardModelSource
from lmforge.rewards.source import CallableSource, RewardConfigError, RewardSource, ScoringBatch, resolve_callable
from lmforge.rl.ensemble import ENSEMBLE_MODES, ensemble_reward, ensemble_std


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
    # How the reward models among the sources combine: sum (each with its weight) | mean | uwo
    # (mean - ensemble_lambda * std over the models) | wco (min over the models). Train the
    # members on the same preferences with different seeds (python train.py algo=reward seed=k).
    ensemble: str = "sum"
    ensemble_lambda: float = 1.0


class RewardFunction:
    """sum_i weight_i * source_i(batch), or with an ensemble mode the reward models' combined score
    plus the weighted callables; returns the total and each source's own (unweighted) scores."""

    def __init__(self, sources: list[tuple[RewardSource, float]], ensemble: str = "sum", ensemble_lambda: float = 1.0):
        if not sources:
            raise RewardConfigError("a reward needs at least one source")
        names = [s.name for s, _ in sources]
        if len(set(names)) != len(names):
            raise RewardConfigError(f"reward source names must be unique, got {names}: set `name:` on the sources")
        if ensemble not in ("sum", *ENSEMBLE_MODES):
            raise RewardConfigError(f"algo.reward.ensemble={ensemble!r}: use sum, {', '.join(ENSEMBLE_MODES)}")
        if ensemble != "sum":
            if {"ensemble", "ensemble_std"} & set(names):
                raise RewardConfigError("reward source names `ensemble` and `ensemble_std` are the ensemble's own")
            members = [(s, w) for s, w in sources if isinstance(s, RewardModelSource)]
            if len(members) < 2:
                raise RewardConfigError(
                    f"algo.reward.ensemble={ensemble} needs at least two reward models among the sources, got "
                    f"{len(members)}: list them as algo.reward.sources=[{{ckpt: rm1}},{{ckpt: rm2}},...]"
                )
            if any(w != 1.0 for _, w in members):
                raise RewardConfigError(
                    f"algo.reward.ensemble={ensemble}: the ensemble's members are equals; leave their weight at 1"
                )
            if not (math.isfinite(ensemble_lambda) and ensemble_lambda >= 0):
                raise RewardConfigError(f"algo.reward.ensemble_lambda={ensemble_lambda} must be a number >= 0")
        self.sources = sources
        self.ensemble = ensemble
        self.ensemble_lambda = float(ensemble_lambda)

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
        members = []
        for source, weight in self.sources:
            s = source(batch).float()
            s = s.to(device) if device is not None else s
            parts[source.name] = s
            if self.ensemble != "sum" and isinstance(source, RewardModelSource):
                members.append(s)
                continue
            total = weight * s if total is None else total + weight * s
        if members:
            scores = torch.stack(members)
            combined = ensemble_reward(scores, self.ensemble, self.ensemble_lambda)
            parts["ensemble"], parts["ensemble_std"] = combined, ensemble_std(scores)
            total = combined if total is None else total + combined
        return total, parts


def _source_configs(cfg) -> list[dict]:
    entries = []
    if cfg.get("model"):
        entries.append({"ckpt": str(cfg.get("model")), "weight": 1.0, "normalize": True, "name": None, "args": {}})
    for i, s in enumerate(cfg.get("sources") or []):
        s = {k: s[k] for k in s}
        entries.append(
            {
                "ckpt": s.get("ckpt"),
                "_target_": s.get("_target_"),
                "args": dict(s.get("args") or {}),
                "weight": float(s.get("weight", 1.0)),
                "normalize": bool(s.get("normalize", True)),
                "name": s.get("name"),
                "index": i,
            }
        )
    return entries


def build_reward(cfg, tokenizer=None, micro_batch_size: int = 32) -> RewardFunction:
    """The RewardFunction an `algo.reward` config (RLRewardConfig or an equivalent dict) describes."""
    entries = _source_configs(cfg)
    if not entries:
        raise RewardConfigError(
            "algo.reward has no source: set algo.reward.model=<a reward-model checkpoint>, or list "
            "sources, e.g. 'algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]'"
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
            source: RewardSource = RewardModelSource(
                e["ckpt"], tokenizer=tokenizer, normalize=e["normalize"], name=name, micro_batch_size=micro_batch_size
            )
        else:
            source = CallableSource(resolve_callable(e["_target_"], e["args"]), name=e["name"])
        sources.append((source, e["weight"]))
    return RewardFunction(sources, ensemble=cfg.get("ensemble", "sum"), ensemble_lambda=cfg.get("ensemble_lambda", 1.0))
