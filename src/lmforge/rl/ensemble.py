"""Combining the scores of an ensemble of reward models into one reward, conservatively.

A policy optimized against one learned reward model finds the responses that model over-rates:
the proxy reward keeps rising while the true score falls (Gao et al., 2022, "Scaling Laws for
Reward Model Overoptimization"). Reward models trained on the same preferences but from
different seeds disagree most exactly where they are wrong, so penalizing their disagreement
holds the policy back from those responses (Coste et al., 2023, "Reward Model Ensembles Help
Mitigate Overoptimization"):

    mean  r = mean_k r_k
    uwo   r = mean_k r_k - lam * std_k r_k      (uncertainty-weighted optimization)
    wco   r = min_k r_k                           (worst-case optimization)

`std` is the population standard deviation over the K models (ddof 0), so one model has no
penalty and two models that agree have none either. Coste et al. penalize the variance;
the standard deviation is in reward units, so `lam` reads as "how many disagreements of the
ensemble a response gives up".
"""

from __future__ import annotations

from torch import Tensor

ENSEMBLE_MODES = ("mean", "uwo", "wco")


def ensemble_reward(scores: Tensor, mode: str = "uwo", lam: float = 1.0) -> Tensor:
    """scores (K, B) of K reward models for B responses -> the combined reward (B,)."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be (K models, B responses), got shape {tuple(scores.shape)}")
    if mode == "mean":
        return scores.mean(0)
    if mode == "uwo":
        return scores.mean(0) - lam * ensemble_std(scores)
    if mode == "wco":
        return scores.min(0).values
    raise ValueError(f"unknown ensemble mode {mode!r}; use one of {', '.join(ENSEMBLE_MODES)}")


def ensemble_std(scores: Tensor) -> Tensor:
    """The models' disagreement on each response: population std over K, (K, B) -> (B,)."""
    return scores.std(0, correction=0)
