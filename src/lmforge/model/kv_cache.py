"""The KV cache: keys and values of the tokens a Transformer has already processed, so that
decoding one more token costs one position instead of the whole prefix. Attention
(transformer.py) writes through it; generation.py allocates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lmforge.model.transformer import ModelConfig


class KVCache:
    """Keys and values of the tokens already processed, for every layer, so decoding a token
    costs one position instead of the whole prefix. Preallocated (B, Hkv, max_len, D) per layer;
    columns [0, length) are filled. `length` is one int for the whole batch: batched generation
    left-pads, so all rows advance in lockstep.

    static=True: attention always reads all max_len columns (the unfilled ones are in every
    query's future, so the causal mask hides them) and writes go through index_copy_. Every
    decode step then has the same shapes, which torch.compile and CUDA graphs need to reuse one
    compiled step; the price is attending over max_len keys instead of length.

    dtype=None (what generation uses): each layer's buffers are made at its first write, in the
    dtype of the keys/values written -- fp32 for an fp32 model, bf16 under bf16 autocast or with
    bf16 weights -- so the cache never stores more bits than attention computes with, and never
    fails to take what the model produces. Later writes of another dtype are cast to the cache's."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        n_layer: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ):
        self.shape = shape  # (B, Hkv, max_len, D) of every layer's keys and of its values
        self.device = device
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        if dtype is not None:
            self.k = [self._zeros(dtype) for _ in range(n_layer)]
            self.v = [self._zeros(dtype) for _ in range(n_layer)]
        self.length = 0
        self.static = static

    @classmethod
    def allocate(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> KVCache:
        return cls((batch_size, cfg.n_kv_head, max_len, cfg.head_dim), cfg.n_layer, device, dtype, static)

    def _zeros(self, dtype: torch.dtype) -> Tensor:
        return torch.zeros(self.shape, device=self.device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def dtype(self, layer: int) -> torch.dtype | None:
        """The dtype `layer`'s buffers hold (None before its first write with dtype=None)."""
        return None if self.k[layer] is None else self.k[layer].dtype

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) at columns [length, length + T) of `layer` and return all
        of its filled columns (B, Hkv, length + T, D). Transformer.forward advances `length`
        once every layer has written. A static cache returns all max_len columns."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = self._zeros(k.dtype), self._zeros(v.dtype)
        cache_k, cache_v = self.k[layer], self.v[layer]
        k, v = k.to(cache_k.dtype), v.to(cache_v.dtype)  # no-ops unless the dtype changed mid-way
        end = self.length + k.shape[2]
        if self.static:
            columns = torch.arange(self.length, end, device=k.device)
            cache_k.index_copy_(2, columns, k)
            cache_v.index_copy_(2, columns, v)
            return cache_k, cache_v
        cache_k[:, :, self.length : end] = k
        cache_v[:, :, self.length : end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]
