"""The decoder-only Transformer every lmforge stage trains, top to bottom in one file:
config -> norms -> rotary embeddings -> attention -> MLP -> block -> model. The KV cache that
decoding writes through attention is in kv_cache.py.

One ModelConfig spans two families:

* GPT-2: layernorm, learned positions, gelu MLP, biases, tied embeddings;
* Llama: rmsnorm, rotary positions (RoPE), swiglu MLP, no biases, grouped-query attention.
  Variants of it that Hugging Face families need: `qkv_bias` (Qwen2: biases on the q/k/v
  projections only) and RoPE scaling (`rope_scaling`: "linear", "llama3") for long contexts.

Shape letters in comments: B batch, T tokens in this call, S = tokens already in the KV
cache + T (the key length), H query heads, Hkv key/value heads, D head_dim.

Padding. `attention_mask` is (B, S), 1/True = real token, 0 = pad. Positions count from each
row's first real token, so a padded row computes what it would compute alone:

* batched generation LEFT-pads prompts: every row's next token lands in the same column, so
  one `KVCache.length` serves the whole batch;
* training batches may RIGHT-pad: hidden states at real tokens are exact too (the reward model
  reads the last real one). Hidden states at pad positions are finite garbage; mask them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.model.kv_cache import KVCache


class ModelConfigError(ValueError):
    """A ModelConfig field holds a value the model cannot be built with."""


_CHOICES = {
    "attention": ("auto", "sdpa", "flash", "eager"),
    "norm": ("rmsnorm", "layernorm"),
    "pos": ("rope", "learned"),
    "activation": ("swiglu", "gelu"),
}
_POSITIVE_INTS = (
    "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size", "max_seq_len", "rope_original_max_seq_len",
)  # fmt: skip
# RoPE scalings lmforge computes exactly as Hugging Face does. Others ("dynamic", "yarn",
# "longrope", ...) change the attention itself or depend on the sequence length; the HF
# importer refuses them by name.
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters. Primitive fields only (it doubles as the Hydra schema of
    `model:`); derived sizes are properties."""

    n_layer: int
    n_head: int
    n_kv_head: int  # grouped-query attention: n_head % n_kv_head == 0
    d_model: int  # head_dim = d_model // n_head
    d_ff: int  # MLP hidden width (swiglu: width of each of the gate and up projections)
    vocab_size: int
    max_seq_len: int
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    pos: str = "rope"  # "rope" | "learned"
    activation: str = "swiglu"  # "swiglu" | "gelu"
    bias: bool = False  # bias on every Linear and on LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Bias on the fused q/k/v projection only, even with bias=False (Qwen2). bias=True implies it.
    qkv_bias: bool = False
    # RoPE scaling ("none" | "linear" | "llama3"), as in Hugging Face's `rope_scaling`:
    #   linear: every inverse frequency / rope_factor (position interpolation);
    #   llama3: Llama 3.1's per-frequency interpolation: wavelengths longer than
    #     rope_original_max_seq_len / rope_low_freq_factor are divided by rope_factor, shorter
    #     than .../ rope_high_freq_factor kept, those between blended smoothly.
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_seq_len: int = 8192  # llama3 only: the context the model was pretrained at
    # How attention is computed (the math is the same; see CausalSelfAttention):
    #   auto:  SDPA, whose dispatcher picks flash / memory-efficient kernels on CUDA and the
    #          fused flash-style kernel on CPU;
    #   sdpa:  the same call (named for configs that want to say so);
    #   flash: SDPA restricted to the flash kernel (CUDA, bf16/fp16): fails loudly where it cannot run;
    #   eager: softmax(q k^T / sqrt(D)) v written out, materializing the (T, S) scores.
    # Not part of the checkpoint's shape: a model trained with one loads with any other.
    attention: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_groups(self) -> int:
        """Query heads sharing one key/value head."""
        return self.n_head // self.n_kv_head

    def validate(self) -> None:
        for key in _POSITIVE_INTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model.{key}={value!r} must be a positive integer")
        for key, choices in _CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise ModelConfigError(f"model.{key}={value!r} is not supported: pick one of {choices}")
        if self.d_model % self.n_head:
            raise ModelConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: "
                "pick d_model as a multiple of n_head"
            )
        if self.n_head % self.n_kv_head:
            raise ModelConfigError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}: "
                "each key/value head serves an equal group of query heads, so pick n_kv_head as a "
                "divisor of n_head (n_kv_head=n_head is plain multi-head attention)"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ModelConfigError(
                f"model.pos='rope' needs an even head_dim, but model.d_model={self.d_model} / "
                f"model.n_head={self.n_head} = {self.head_dim}: RoPE rotates pairs of channels; "
                "change d_model or n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"model.dropout={self.dropout!r} must be in [0, 1): use 0.0 to disable dropout")
        if not self.rope_theta > 0:
            raise ModelConfigError(f"model.rope_theta={self.rope_theta!r} must be positive (10000.0 is standard)")
        if not self.norm_eps > 0:
            raise ModelConfigError(f"model.norm_eps={self.norm_eps!r} must be positive (1e-5 is standard)")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ModelConfigError(
                f"model.rope_scaling={self.rope_scaling!r} is not supported: pick one of {ROPE_SCALINGS} "
                "(dynamic NTK, YaRN and LongRoPE scalings are not implemented)"
            )
        if self.rope_scaling == "none":
            return
        if self.pos != "rope":
            raise ModelConfigError(
                f"model.rope_scaling={self.rope_scaling!r} scales rotary positions, but model.pos={self.pos!r}: "
                "use rope_scaling='none'"
            )
        if not self.rope_factor > 0:
            raise ModelConfigError(f"model.rope_factor={self.rope_factor!r} must be positive (e.g. 8.0)")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ModelConfigError(
                f"model.rope_low_freq_factor={self.rope_low_freq_factor!r} and model.rope_high_freq_factor="
                f"{self.rope_high_freq_factor!r} must satisfy 0 < low < high (Llama 3.1 uses 1.0 and 4.0)"
            )


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without mean subtraction or bias (Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        # In fp32: a mean of squares in bf16 keeps ~3 significant digits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------- rotary positions


def rope_inverse_frequencies(cfg: ModelConfig) -> Tensor:
    """(D/2,) fp32 angle per position of each channel pair, with cfg's RoPE scaling. Written
    with the very float operations of Hugging Face's `modeling_rope_utils`, so the cos/sin
    tables are bit-identical to transformers' (a one-ulp difference in a frequency grows into
    1e-4 radians by position 4096)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).to(torch.float32) / D))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_seq_len
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, "rotate half" layout (Llama / HF):
    channel i pairs with channel i + D/2 rather than with its neighbour (the paper's
    interleaved layout), so HF Llama q/k weights load without a permutation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.max_seq_len = cfg, cfg.max_seq_len
        self.register_buffer("cos", None, persistent=False)  # (max_seq_len, D)
        self.register_buffer("sin", None, persistent=False)
        self._build_tables(device=None)

    def _build_tables(self, device: torch.device | None) -> None:
        # Always fp32: in bf16 the angle position * frequency is off by whole radians past a
        # few hundred positions. Explicit dtypes also beat a bf16 torch.set_default_dtype.
        inv_freq = rope_inverse_frequencies(self.cfg).to(device)  # (D/2,)
        position = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        angle = torch.outer(position, inv_freq)  # (max_seq_len, D/2)
        angle = torch.cat([angle, angle], dim=-1)  # both channels of a pair share an angle
        self.cos, self.sin = angle.cos(), angle.sin()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would cast the tables too: rebuild them in fp32
        # wherever they landed. This also fills them after meta-device init + to_empty().
        super()._apply(fn, recurse)
        self._build_tables(self.cos.device)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, T, D) in fp32."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every channel pair of x (B, H, T, D) by its token's angle; cos/sin (B, T, D)."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)  # the pair (a, b) -> (-b, a): a 90 degree turn
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return (x32 * cos + rotated * sin).type_as(x)


# ----------------------------------------------------------------------------- attention


def build_attention_mask(
    attention_mask: Tensor | None, T: int, S: int, device: torch.device, key_len: int | None = None
) -> Tensor:
    """(B or 1, 1, T, key_len) bool for SDPA, True = may attend: the key is not in the future and
    is a real token. The T queries are columns S-T .. S-1; key_len (default S) may be larger
    (a static KV cache), the columns past S being in every query's future."""
    query_col = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    key_col = torch.arange(S if key_len is None else key_len, device=device)[None, :]  # (1, key_len)
    allowed = (key_col <= query_col)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    # A pad query may see no real key, and a fully masked row is softmax(all -inf) = NaN.
    # NaN values at a pad would reach real tokens in the next layer (0 weight * NaN = NaN),
    # so every query always sees itself; pad keys stay invisible to real queries.
    return allowed | (key_col == query_col)[None, None]


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(D)) v with q (B, H, T, D), k/v (B, H, S, D): what SDPA computes,
    written out. mask (B or 1, 1, T, S) bool, True = may attend; None = causal over the last T
    of the S columns."""
    T, S = q.shape[-2], k.shape[-2]
    # Dividing by sqrt(D) keeps the scores' variance ~1 whatever the head size, so the softmax
    # does not saturate as D grows (Attention Is All You Need, 3.2.1).
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
    return weights @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout, self.impl = cfg.dropout, cfg.attention
        # One matmul for all three: H query heads, then Hkv key heads, then Hkv value heads.
        self.qkv = nn.Linear(
            cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias
        )
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)  # residual projection
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, D)
        if Hkv != H:
            # Key/value head j serves query heads j*groups ... (j+1)*groups - 1 (as in HF's
            # repeat_kv). Materialized rather than SDPA's enable_gqa (torch>=2.5 only, and not
            # accepted by every backend).
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "eager":
            y = eager_attention(q, k, v, mask, dropout)
        else:
            # "flash" restricts SDPA to the flash kernel; otherwise its dispatcher chooses. No mask
            # means a plain causal batch: is_causal lets SDPA pick its fused (flash) kernels.
            only_flash = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if self.impl == "flash" else nullcontext()
            with only_flash:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # heads side by side again
        return self.resid_drop(self.out_proj(y))


# ----------------------------------------------------------------------------- MLP and block


class MLP(nn.Module):
    """swiglu: down(silu(gate(x)) * up(x)); gelu: down(gelu(up(x))) as in GPT-2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # residual projection
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            hidden = F.gelu(self.up(x), approximate="tanh")
        else:
            hidden = F.silu(self.gate(x)) * self.up(x)
        return self.drop(self.down(hidden))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    """Token ids -> final-normed hidden states (B, T, d_model). The heads (LM, scalar) live in
    heads.py. Build under `with torch.device("meta"):` to size a model without memory."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.rope = RotaryEmbedding(cfg) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init. Call again after building on the meta device and `to_empty()`."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        # Each block adds two projections into the residual stream, so its variance grows with
        # 2 * n_layer terms; dividing their std by sqrt(2 * n_layer) keeps the sum's scale
        # independent of depth (GPT-2 paper, section 2.3).
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """idx (B, T) token ids -> hidden states (B, T, d_model).

        attention_mask: (B, S) 1 = real, 0 = pad, S = kv_cache.length + T (None: all real);
            (B, kv_cache.max_len) with a static cache.
        positions: (B, T) position ids; by default counted from each row's first real token.
        kv_cache: keys/values of earlier tokens; this call appends T columns to it.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, tokens) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.length
        S = past + T
        key_len = kv_cache.max_len if kv_cache is not None and kv_cache.static else S
        self._check_inputs(B, S, key_len, attention_mask, kv_cache)
        if positions is None:
            positions = self._positions(B, T, S, attention_mask, idx.device)
        else:
            self._check_positions(positions, B, T)

        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        rope = self.rope(positions) if self.rope is not None else None
        mask = None
        if attention_mask is not None or kv_cache is not None:
            mask = build_attention_mask(attention_mask, T, S, idx.device, key_len)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length = S
        return self.norm_f(x)

    def _positions(self, B: int, T: int, S: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
        if attention_mask is None:
            return torch.arange(S - T, S, device=device).expand(B, T)
        # Count real tokens: each row's first real token is position 0, whatever padding
        # precedes it; a pad repeats its neighbour's position (clamped at 0 before the first).
        return (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, S - T : S]

    def _check_inputs(
        self, B: int, S: int, key_len: int, attention_mask: Tensor | None, kv_cache: KVCache | None
    ) -> None:
        cfg = self.cfg
        if S > cfg.max_seq_len:
            raise ValueError(
                f"{S} tokens (cached + new) exceed model.max_seq_len={cfg.max_seq_len}: "
                "truncate the input or train a model with a longer max_seq_len"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, key_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, key_len)}: "
                + (
                    "one column per column of the static KV cache"
                    if key_len != S
                    else "one column per cached token plus one per new token"
                )
            )
        if kv_cache is not None and (kv_cache.batch_size != B or S > kv_cache.max_len):
            raise ValueError(
                f"KVCache of batch {kv_cache.batch_size} and {kv_cache.max_len} columns cannot take "
                f"{S} columns for batch {B}: allocate it with the batch size and the total length"
            )

    def _check_positions(self, positions: Tensor, B: int, T: int) -> None:
        if tuple(positions.shape) != (B, T):
            raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {(B, T)}")
        # Derived positions are < S <= max_seq_len already; only caller-given ones get this
        # (device-syncing) look.
        if positions.device.type != "meta" and int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} >= model.max_seq_len={self.cfg.max_seq_len}: "
                "the position tables end there; shorten the sequence"
            )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context seq_len, PaLM appendix B:

            6 N + 12 n_layer d_model seq_len

        N counts weights that take part in a matmul: every Linear weight plus the LM head
        (vocab_size x d_model), even when tied to wte -- the embedding lookup is free, the
        output projection is not. 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
        12 L d T is attention itself: QK^T and AV each cost 2 d T per token and layer forward,
        x3 with backward. Biases, norms and softmax are ignored."""
        cfg = self.cfg
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul_params += cfg.vocab_size * cfg.d_model
        return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.d_model * seq_len
