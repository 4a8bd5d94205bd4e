"""Batched sampling from a CausalLM: left-padded prompts, one prefill, then one token per step
through the KV cache.

Prompts are LEFT-padded so every row's next token lands in the same column: one cache length
serves the whole batch, and the new tokens of all rows form the block sequences[:, P:].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.model.heads import CausalLM
from lmforge.model.kv_cache import KVCache


@dataclass
class GenerationOutput:
    """N = max_new_tokens even when every row stopped early; unfilled columns are pad_id, masked."""

    sequences: Tensor  # (B, P + N) long: left-padded prompts, then generated tokens (pad_id after EOS)
    attention_mask: Tensor  # (B, P + N) bool: real prompt tokens, response tokens up to the first EOS included
    response_mask: Tensor  # (B, N) bool: generated tokens up to and including the first EOS
    prompt_len: int  # P, the width of the padded prompt block
    ended_with_eos: Tensor  # (B,) bool


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top_k largest and outside the nucleus: the smallest
    set of most likely tokens whose probability reaches top_p. The most likely token always
    survives. logits (..., V)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable)")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones before it already reach top_p; the first
        # token has nothing before it (mass 0 < top_p), so at least one is kept.
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (B, V) -> tokens (B,) long. temperature 0 is greedy (argmax). Sampling runs in
    float32; a generator must live on the logits' device."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _left_pad(prompts: list[list[int]], pad_id: int, total_len: int) -> tuple[Tensor, Tensor]:
    """(B, total_len) tokens and bool mask with each prompt ending at column P = longest prompt."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), total_len), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) : width] = True
    return tokens, mask


def _check_request(model, prompts, max_new_tokens: int, pad_id: int) -> None:
    cfg = model.cfg
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(
            f"pad_id={pad_id} is not a token id of this model (vocab_size={cfg.vocab_size}): pass a "
            "real id such as the tokenizer's pad or EOS id; padded columns are masked out anyway"
        )
    total = max(len(p) for p in prompts) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens={max_new_tokens} "
            f"= {total} exceeds model.max_seq_len={cfg.max_seq_len}: truncate the prompts from the "
            "left or lower max_new_tokens"
        )


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    static_cache: bool = False,
    on_tokens: Callable[[Tensor], None] | None = None,
) -> GenerationOutput:
    """Continue each prompt by up to max_new_tokens tokens; a row stops after its first EOS.

    use_cache=False re-runs the whole context every step (benchmarks, and to check the cache).
    static_cache=True gives every decode step the same shapes (see KVCache), for torch.compile.
    on_tokens receives the (B,) tokens of every step (pad_id for finished rows), for streaming.
    The model runs in eval mode and gets its previous mode back.
    """
    _check_request(model, prompts, max_new_tokens, pad_id)
    param = next(model.parameters())
    P = max(len(p) for p in prompts)
    total = P + max_new_tokens
    tokens, mask = _left_pad(prompts, pad_id, total)
    sequences, attention_mask = tokens.to(param.device), mask.to(param.device)
    B = len(prompts)
    kv_cache = None
    if use_cache:
        # No dtype: the cache takes the keys' dtype (bf16 under autocast or with bf16 weights).
        kv_cache = KVCache.allocate(model.cfg, B, total, param.device, static=static_cache)
    finished = torch.zeros(B, dtype=torch.bool, device=param.device)

    was_training = model.training
    model.eval()
    try:
        for t in range(P, total):
            first_new = kv_cache.length if use_cache else 0  # the cache already holds [0, first_new)
            logits = model(
                sequences[:, first_new:t],
                attention_mask=attention_mask if use_cache and static_cache else attention_mask[:, :t],
                kv_cache=kv_cache,
                last_only=True,
            )
            next_tokens = sample_from_logits(logits[:, -1], temperature, top_k, top_p, generator)
            next_tokens = next_tokens.masked_fill(finished, pad_id)
            sequences[:, t] = next_tokens
            attention_mask[:, t] = ~finished  # a row's EOS is still real; what follows is not
            if on_tokens is not None:
                on_tokens(next_tokens)
            finished |= next_tokens == eos_id
            if bool(finished.all()):
                break
    finally:
        model.train(was_training)

    return GenerationOutput(
        sequences=sequences,
        attention_mask=attention_mask,
        response_mask=attention_mask[:, P:],
        prompt_len=P,
        ended_with_eos=finished,
    )
