"""Hugging Face `config.json` <-> lmforge ModelConfig, for the families lmforge's backbone
computes exactly.

Supported (`model_type`):

* "llama" (Llama 1/2/3, TinyLlama, SmolLM, ...), "mistral", "qwen2" (Qwen2, Qwen2.5):
  RMSNorm, RoPE (theta, "linear"/"llama3" scaling), SwiGLU, grouped-query attention, tied or
  untied embeddings; Qwen2's biases on the q/k/v projections (`qkv_bias`);
* "gpt2": LayerNorm, learned positions, GELU (tanh), biases everywhere, Conv1D weights.

Anything these families can express that lmforge cannot compute the same way is refused by
name (UnsupportedModelError) rather than imported into a silently different model.
Both config.json layouts are read: transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`); export writes the 4.x layout, which both read.
"""

from __future__ import annotations

from typing import Any

from lmforge.model import ModelConfig, ModelConfigError

LLAMA_STYLE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_STYLE, "gpt2")
# transformers' per-class default of tie_word_embeddings, for a config.json that omits it.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gpt2": True}
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}
# Activations computed as lmforge's gelu (tanh approximation), up to float rounding.
_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class UnsupportedModelError(ValueError):
    """A Hugging Face model (or an lmforge one, on export) that the other side cannot represent
    exactly; the message names the field and value."""


def _refuse(model_type: str, what: str, hint: str = "") -> None:
    raise UnsupportedModelError(
        f"cannot import this {model_type!r} model: {what}. "
        + (hint + " " if hint else "")
        + f"(lmforge imports {', '.join(SUPPORTED_MODEL_TYPES)} models it can compute exactly)"
    )


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of either config.json layout, as one dict with `rope_type` and
    `rope_theta` (transformers 5 `rope_parameters`; 4.x `rope_theta` + `rope_scaling`)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params or "sliding_attention" in params:  # per-layer-type rope
            _refuse(hf.get("model_type", "?"), f"per-layer-type rope_parameters {sorted(params)}")
        out = dict(params)
    else:
        out = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            out["rope_theta"] = hf["rope_theta"]
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    out.setdefault("rope_theta", 10000.0)
    if "partial_rotary_factor" in hf:
        out.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return out


def _rope_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    rope = rope_parameters(hf)
    kind = rope["rope_type"]
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(model_type, f"partial_rotary_factor={rope['partial_rotary_factor']} (RoPE on part of each head)")
    out: dict[str, Any] = {"rope_theta": float(rope["rope_theta"])}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(rope["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_seq_len": int(rope["original_max_position_embeddings"]),
        }
    _refuse(
        model_type,
        f"rope_scaling type {kind!r}",
        "lmforge computes RoPE scalings 'linear' and 'llama3' exactly; 'dynamic', 'yarn', 'longrope' and "
        "others change with the sequence length or scale the attention, and are not implemented.",
    )
    raise AssertionError  # unreachable


def _check_window(hf: dict[str, Any], model_type: str, max_seq_len: int) -> None:
    """Sliding-window attention equals full attention while the context fits in the window."""
    window = hf.get("sliding_window")
    uses_window = window is not None
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        uses_window = bool(hf.get("use_sliding_window")) or "sliding_attention" in layer_types
    if uses_window and window is not None and int(window) < max_seq_len:
        _refuse(
            model_type,
            f"sliding_window={window} is smaller than the context of {max_seq_len} tokens "
            "(lmforge attends to the whole context)",
            f"Import with max_seq_len={window}: within the window both attentions are the same.",
        )


def hf_to_model_config(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """A config.json dict -> the ModelConfig that computes the same function.

    max_seq_len: a shorter context than max_position_embeddings (smaller RoPE tables; a
    Mistral-style sliding window then covers it). Not for GPT-2, whose position table is a
    weight of n_positions rows."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} (architectures {hf.get('architectures')}) is not supported: "
            f"lmforge imports {', '.join(SUPPORTED_MODEL_TYPES)} (Llama, TinyLlama, SmolLM, Mistral, Qwen2/2.5, "
            "GPT-2 checkpoints)"
        )
    try:
        mc = _gpt2_config(hf, max_seq_len) if model_type == "gpt2" else _llama_config(hf, model_type, max_seq_len)
        mc.validate()
    except ModelConfigError as e:
        raise UnsupportedModelError(f"cannot import this {model_type!r} model: {e}") from None
    return mc


def _llama_config(hf: dict[str, Any], model_type: str, max_seq_len: int | None) -> ModelConfig:
    d_model, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _refuse(model_type, f"hidden_act={act!r}", "lmforge's gated MLP is SwiGLU (silu).")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * n_head != d_model:
        _refuse(
            model_type,
            f"head_dim={head_dim} with {n_head} heads != hidden_size={d_model}",
            "lmforge derives head_dim as hidden_size / num_attention_heads.",
        )
    if model_type == "qwen2":
        qkv_bias, bias = True, False  # Qwen2: q/k/v projections have biases, nothing else does
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            _refuse(
                model_type,
                f"attention_bias={attention_bias} with mlp_bias={mlp_bias}",
                "lmforge's `bias` puts biases on all projections or none.",
            )
        qkv_bias, bias = False, attention_bias
    positions = int(hf.get("max_position_embeddings", 2048))
    ctx = positions if max_seq_len is None else int(max_seq_len)
    _check_window(hf, model_type, ctx)
    return ModelConfig(
        n_layer=int(hf["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
        d_model=d_model,
        d_ff=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        max_seq_len=ctx,
        norm="rmsnorm",
        pos="rope",
        activation="swiglu",
        bias=bias,
        qkv_bias=qkv_bias,
        dropout=0.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", _TIE_DEFAULT[model_type])),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **_rope_fields(hf, model_type),
    )


def _gpt2_config(hf: dict[str, Any], max_seq_len: int | None) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_GELUS:
        _refuse("gpt2", f"activation_function={act!r}", f"lmforge's GELU is the tanh approximation {_GPT2_GELUS}.")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                    ("add_cross_attention", False)):  # fmt: skip
        if bool(hf.get(key, ok)) != ok:
            _refuse("gpt2", f"{key}={hf.get(key)}")
    positions = int(hf.get("n_positions", 1024))
    if max_seq_len is not None and int(max_seq_len) != positions:
        _refuse(
            "gpt2", f"max_seq_len={max_seq_len}", f"GPT-2's learned position table has n_positions={positions} rows."
        )
    d_model = int(hf["n_embd"])
    return ModelConfig(
        n_layer=int(hf["n_layer"]),
        n_head=int(hf["n_head"]),
        n_kv_head=int(hf["n_head"]),
        d_model=d_model,
        d_ff=int(hf.get("n_inner") or 4 * d_model),
        vocab_size=int(hf["vocab_size"]),
        max_seq_len=positions,
        norm="layernorm",
        pos="learned",
        activation="gelu",
        bias=True,
        dropout=0.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


# ============================================================================ export


def family_of(mc: ModelConfig, model_type: str | None = None) -> str:
    """The HF model_type an lmforge config exports as (default: the natural one)."""
    gpt2_like = (mc.norm, mc.pos, mc.activation) == ("layernorm", "learned", "gelu")
    llama_like = (mc.norm, mc.pos, mc.activation) == ("rmsnorm", "rope", "swiglu")
    shape = f"norm={mc.norm!r}, pos={mc.pos!r}, activation={mc.activation!r}"
    if not (gpt2_like or llama_like):
        raise UnsupportedModelError(
            f"cannot export model.{shape}: Hugging Face families are layernorm/learned/gelu (gpt2) or "
            "rmsnorm/rope/swiglu (llama, mistral, qwen2)"
        )
    if model_type is None:
        model_type = "gpt2" if gpt2_like else ("qwen2" if mc.qkv_bias and not mc.bias else "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type={model_type!r}: export writes one of {SUPPORTED_MODEL_TYPES}")
    problems = []
    if (model_type == "gpt2") != gpt2_like:
        problems.append(f"model.{shape} is not a {model_type} architecture")
    if model_type == "gpt2" and (not mc.bias or mc.n_kv_head != mc.n_head):
        problems.append(f"gpt2 needs model.bias=True and n_kv_head == n_head (got {mc.bias}, {mc.n_kv_head})")
    if model_type == "qwen2" and (mc.bias or not mc.qkv_bias):
        problems.append("qwen2 has biases on q/k/v only: needs model.qkv_bias=True and model.bias=False")
    if model_type in ("llama", "mistral") and mc.qkv_bias and not mc.bias:
        problems.append(f"{model_type} has no q/k/v-only biases (model.qkv_bias=True): export as model_type=qwen2")
    if model_type == "mistral" and mc.bias:
        problems.append("mistral has no biases (model.bias=True)")
    if model_type != "llama" and mc.rope_scaling == "llama3":
        problems.append(f"rope_scaling='llama3' is exported as llama only, not {model_type}")
    if problems:
        raise UnsupportedModelError("cannot export: " + "; ".join(problems))
    return model_type


def model_config_to_hf(
    mc: ModelConfig,
    model_type: str,
    *,
    sequence_classification: bool = False,
    dtype: str = "float32",
    special_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """The config.json of `mc` as model_type (see family_of), in the transformers 4.x layout."""
    ids = special_ids or {}
    head = (
        "ForSequenceClassification"
        if sequence_classification
        else ("LMHeadModel" if model_type == "gpt2" else "ForCausalLM")
    )
    cfg: dict[str, Any] = {"architectures": [_CLASS_PREFIX[model_type] + head], "model_type": model_type}
    if model_type == "gpt2":
        cfg.update(
            vocab_size=mc.vocab_size, n_positions=mc.max_seq_len, n_embd=mc.d_model, n_layer=mc.n_layer,
            n_head=mc.n_head, n_inner=mc.d_ff, activation_function="gelu_new", layer_norm_epsilon=mc.norm_eps,
            resid_pdrop=mc.dropout, embd_pdrop=mc.dropout, attn_pdrop=mc.dropout, scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        )  # fmt: skip
    else:
        cfg.update(
            vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.d_ff,
            num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head, num_key_value_heads=mc.n_kv_head,
            head_dim=mc.head_dim, hidden_act="silu", max_position_embeddings=mc.max_seq_len,
            rms_norm_eps=mc.norm_eps, rope_theta=mc.rope_theta, attention_dropout=mc.dropout,
        )  # fmt: skip
        if mc.rope_scaling == "linear":
            cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": mc.rope_factor}
        elif mc.rope_scaling == "llama3":
            cfg["rope_scaling"] = {
                "rope_type": "llama3", "factor": mc.rope_factor, "low_freq_factor": mc.rope_low_freq_factor,
                "high_freq_factor": mc.rope_high_freq_factor,
                "original_max_position_embeddings": mc.rope_original_max_seq_len,
            }  # fmt: skip
        if model_type == "llama":
            cfg.update(attention_bias=mc.bias, mlp_bias=mc.bias)
        if model_type in ("mistral", "qwen2"):
            cfg["sliding_window"] = None  # lmforge attends to the whole context
        if model_type == "qwen2":
            cfg["use_sliding_window"] = False
    cfg.update(
        tie_word_embeddings=mc.tie_embeddings,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
        torch_dtype=dtype,
        use_cache=True,
    )
    if sequence_classification:
        cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return cfg
