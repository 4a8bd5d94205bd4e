"""Cross-entropy of the LM head computed in row chunks, never materializing the (N, V) logits.

The plain path, F.cross_entropy(hidden @ W.T, targets), writes N x V logits, reads them back
for the log-softmax, writes N x V probabilities in backward and reads them twice more for the
two gradient matmuls. At N = 2048 tokens and V = 4096 that is 32 MB per pass: larger than a CPU's
caches and, at V = 50k, 400 MB of activation memory on a GPU. Here each chunk of rows computes
its logits, loss and softmax gradient while they are still in cache, and the gradients with
respect to the hidden states and the head weight are accumulated during the forward pass (the
loss is the last op of the graph, so its gradient is known up to the incoming scalar). Same
math, same result to float rounding, O(chunk x V) memory instead of O(N x V): what matters for
large vocabularies on a GPU. Speed on a CPU at V = 2-4k: the head + loss alone run ~1.4x faster
(2048 x 256 x 4096), but a whole training step gains nothing measurable (bench/README.md), so
it is off by default (algo.loss_chunk=0).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            valid = t != IGNORE_INDEX
            safe_t = t.masked_fill(~valid, 0)[:, None]
            logits = (h @ weight.T).float()  # in fp32 for the log-softmax, as the plain path
            lse = logits.logsumexp(dim=-1)
            total += ((lse - logits.gather(1, safe_t).squeeze(1)) * valid).sum()
            # d(sum of -log softmax[target]) / d logits = softmax - one_hot(target), 0 on ignored rows.
            grad_logits = (logits - lse[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_t, torch.full_like(lse[:, None], -1.0))
            grad_logits *= valid[:, None]
            if not torch.is_autocast_enabled(h.device.type):  # (autocast casts the matmuls itself)
                grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[start : start + chunk] = grad_logits @ weight
            grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None


def chunked_cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """sum over targets != IGNORE_INDEX of -log softmax(hidden @ weight.T)[target], in fp32.

    hidden (..., d), weight (V, d), targets (...) long; `chunk` rows of logits at a time."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 rows")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):  # evaluation: the loss alone
        t = targets[start : start + chunk]
        logits = (hidden[start : start + chunk] @ weight.T).float()
        total += torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def lm_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """The LM head's summed fp32 cross-entropy over targets != IGNORE_INDEX: chunked when
    chunk > 0, else through the full logits (the plain path)."""
    if chunk > 0:
        return chunked_cross_entropy_sum(hidden, weight, targets, chunk)
    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
