"""Masked statistics over response tokens.

Token-level RL tensors are (B, T) with a ``mask`` that is 1 on real response
tokens (up to and including the first EOS) and 0 after. Statistics must ignore
the padding, otherwise the amount of padding in a batch would shift means and
shrink variances; whitening of rewards/advantages in "The N Implementation
Details of RLHF with PPO" (Huang et al., 2023) is over real tokens only.

Distributed training: pass ``reduce``, a function that *sums* a tensor over all
ranks (e.g. ``lambda t: (dist.all_reduce(t), t)[1]``). Sums and counts are
reduced instead of per-rank means, so ranks with different numbers of real
tokens are weighted correctly and every rank gets the same global statistic.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def _acc_dtype(x: Tensor) -> torch.dtype:
    # bf16/fp16 sums over thousands of tokens lose too many digits.
    return torch.promote_types(x.dtype, torch.float32)


def _sum_count(x: Tensor, mask: Tensor, dim: int | None, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    m = mask.bool()
    # where, not x * mask: padded positions may hold inf/nan (e.g. log-probs of
    # pad tokens) and 0 * inf = nan would poison the sum.
    xs = torch.where(m, x.to(_acc_dtype(x)), 0.0)
    s = xs.sum() if dim is None else xs.sum(dim)
    n = (m.sum() if dim is None else m.sum(dim)).to(xs.dtype)
    if reduce is not None:
        # One collective for both numbers instead of two.
        s, n = reduce(torch.stack([s, n])).unbind(0)
    return s, n


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, reduce: Reduce | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero.

    Over everything (scalar) when ``dim`` is None, else along ``dim``. An empty
    selection yields 0 rather than nan, so a batch with no real tokens gives a
    zero loss and zero gradient instead of poisoning the optimizer state.
    """
    s, n = _sum_count(x, mask, dim, reduce)
    return s / n.clamp_min(1.0)


def _moments(x: Tensor, mask: Tensor, unbiased: bool, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    s, n = _sum_count(x, mask, None, reduce)
    mean = s / n.clamp_min(1.0)
    # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2:
    # one more collective, but no catastrophic cancellation when |mean| >> std.
    ss, _ = _sum_count((x.to(mean.dtype) - mean) ** 2, mask, None, None)
    if reduce is not None:
        ss = reduce(ss)
    denom = (n - 1.0) if unbiased else n
    return mean, ss / denom.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Variance of the masked elements of ``x`` (scalar).

    ``unbiased`` applies Bessel's correction with the (global) token count.
    With fewer than two elements the unbiased variance is 0, not nan.
    """
    return _moments(x, mask, unbiased, reduce)[1]


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = False,
    reduce: Reduce | None = None,
) -> Tensor:
    """Normalise the masked elements of ``x`` to unit variance (and zero mean).

    Mirrors ``whiten`` of openai/lm-human-preferences as described by Huang et
    al. (2023): ``(x - mean) * rsqrt(var + eps)``, and with ``shift_mean=False``
    the mean is added back (used for rewards, whose sign carries meaning).
    ``unbiased=False`` matches the original's ``tf.nn.moments``. Masked-out
    entries of the result are 0 so they cannot leak into later sums.
    """
    mean, var = _moments(x, mask, unbiased, reduce)
    out = (x.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over masked tokens (scalar).

    1 means the critic predicts returns perfectly, 0 that it is no better than
    a constant, negative that it is worse. nan when the returns are constant.
    A diagnostic only, so the inputs are detached.
    """
    values, returns = values.detach(), returns.detach()
    var_y = masked_var(returns, mask, unbiased=False, reduce=reduce)
    var_res = masked_var(returns - values, mask, unbiased=False, reduce=reduce)
    return torch.where(var_y > 0, 1.0 - var_res / var_y, torch.full_like(var_y, float("nan")))
