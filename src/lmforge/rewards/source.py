"""What a reward source is (a batch of responses in, one score per response out) and the kind
that is any Python callable `(prompts, responses) -> scores` named by `_target_`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Reward callables that moved when the package was reorganized by concern: a config written for
# the old path (an experiment file, a resumed run's stored config) still finds them, with a warning.
RENAMED_TARGETS = {
    "lmforge.data.synthetic.ground_truth_reward": "lmforge.world.judge.ground_truth_reward",
    "lmforge.world.synthetic.ground_truth_reward": "lmforge.world.judge.ground_truth_reward",
}


class RewardConfigError(ValueError):
    """An algo.reward entry that cannot be turned into a reward source, with what to change."""


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


def resolve_callable(target: str, args: dict | None = None) -> Callable:
    """The callable a dotted `_target_` names: a function (args bound with functools.partial) or
    a class (instantiated with args; the instance must be callable)."""
    from hydra.utils import get_object

    if target in RENAMED_TARGETS:
        log.warning("algo.reward: _target_=%s moved to %s; update the config", target, RENAMED_TARGETS[target])
        target = RENAMED_TARGETS[target]
    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - any import error becomes one clear message
        raise RewardConfigError(
            f"algo.reward: cannot import _target_={target!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "give the full dotted path of a function or class, e.g. lmforge.world.judge.ground_truth_reward"
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
