"""An lmforge checkpoint -> a Hugging Face model directory (config.json, safetensors, tokenizer
files, generation_config.json) that transformers loads with AutoModelForCausalLM -- or, for a
reward model, AutoModelForSequenceClassification with one label.

The checkpoint is memory-mapped and written one shard at a time; dtypes are kept unless
`dtype=` asks for another. transformers itself is not needed to export.

Reward models: HF's `score` layer has no bias, lmforge's head does. The Bradley-Terry loss
gives that bias no gradient (it cancels in r_chosen - r_rejected; only rounding and
algo.center_coef move it), so it stays ~0. GPT-2's final LayerNorm has a bias, which absorbs
it exactly (ln_f.bias += b * w / |w|^2: the head reads only ln_f's output). The Llama
family's RMSNorm has none: scores come out shifted by the constant b (rankings and preference
probabilities are unchanged); config.json records it as `lmforge_score_bias`, and export
warns when |b| > 1e-4.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.data.hf_tokenizer import HFTokenizer, save_lmforge_tokenizer, tokenizer_from_bytes
from lmforge.hf.hf_config import family_of, model_config_to_hf
from lmforge.hf.weights import lmforge_to_hf, save_safetensors

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ExportWarning(UserWarning):
    pass


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """stage, model_config, tokenizer and state_dict of an lmforge .ckpt, memory-mapped and
    read with weights_only=True (no pickled code runs). Reads both tokenizer kinds."""
    from dataclasses import fields

    from lmforge.model import ModelConfig
    from lmforge.training.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read with weights_only=True ({type(e).__name__}: {e})") from None
    meta = raw.get("lmforge") if isinstance(raw, dict) else None
    if not meta:
        raise CheckpointError(f"{path}: not a lmforge checkpoint (no 'lmforge' metadata entry)")
    known = {f.name for f in fields(ModelConfig)}
    mc = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
    tokenizer = tokenizer_from_bytes(meta["tokenizer"].numpy().tobytes(), source=str(path))
    return {
        "stage": meta["stage"],
        "model_config": mc,
        "tokenizer": tokenizer,
        "state_dict": raw["state_dict"],
        "meta": meta,
    }


def _dtype_name(dtype: str | None, state: dict[str, Tensor]) -> str:
    if dtype is None:
        found = state["backbone.wte.weight"].dtype
        names = {v: k for k, v in _DTYPES.items()}
        if found not in names:
            raise ValueError(f"the checkpoint's weights are {found}; pass dtype=float32|bfloat16|float16")
        return names[found]
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)} (or fp32/bf16/fp16)")
    return dtype


def _fold_score_bias(
    tensors: Iterator[tuple[str, Tensor]], state, model_type: str, cfg: dict
) -> Iterator[tuple[str, Tensor]]:
    bias = state.get("head.bias")
    b = 0.0 if bias is None else float(bias.float().reshape(-1)[0])
    if b == 0.0:
        yield from tensors
        return
    if model_type != "gpt2":
        cfg["lmforge_score_bias"] = b
        if abs(b) <= 1e-4:
            yield from tensors
            return
        warnings.warn(
            f"the reward head's bias {b:.6g} has no place in {model_type}'s bias-free `score` layer: exported "
            "scores are lmforge's minus this constant (rankings and preference probabilities are unchanged); "
            "config.json records it as lmforge_score_bias",
            ExportWarning,
            stacklevel=3,
        )
        yield from tensors
        return
    w = state["head.weight"].float().reshape(-1)
    for key, t in tensors:
        if key.endswith("ln_f.bias"):  # the score reads ln_f's output only: w.(x + d) = w.x + b
            t = (t.float() + b * w / w.dot(w)).to(t.dtype)
        yield key, t


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    model_type: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> dict[str, Any]:
    """Write the HF directory of `checkpoint` to `out`. model_type: llama | mistral | qwen2 |
    gpt2 (default: the natural one for the config). Returns what was written."""
    ckpt = read_checkpoint(checkpoint)
    mc, tok, stage = ckpt["model_config"], ckpt["tokenizer"], ckpt["stage"]
    from lmforge.training.checkpoint import submodule_state

    state = submodule_state(ckpt["state_dict"], "model")
    head = "score" if stage == "reward" else "lm"
    family = family_of(mc, model_type)
    dtype_name = _dtype_name(dtype, state)
    target = _DTYPES[dtype_name]
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    cfg = model_config_to_hf(mc, family, sequence_classification=head == "score", dtype=dtype_name, special_ids=ids)
    if head == "score" and tok.pad_id == tok.eos_id:
        warnings.warn(
            f"pad_token_id == eos_token_id ({tok.eos_id}): transformers' sequence classification reads the last "
            "token that is not pad_token_id, so a sequence ending in EOS is scored one token early there. "
            "Score without padding, or set pad_token_id in config.json to a token your inputs never end with.",
            ExportWarning,
            stacklevel=2,
        )
    out = Path(out)
    tensors = lmforge_to_hf(state, mc, family, head)
    if head == "score":
        tensors = _fold_score_bias(tensors, state, family, cfg)
    tensors = ((k, t if t.dtype == target or not t.is_floating_point() else t.to(target)) for k, t in tensors)
    files = save_safetensors(tensors, out, max_shard_bytes)  # consumes the generator: cfg is final after
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {
        k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id))
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if isinstance(tok, HFTokenizer):
        tok_files = tok.save_pretrained(out)
    else:
        tok_files = save_lmforge_tokenizer(tok, out, mc.max_seq_len)
    return {
        "out": str(out),
        "model_type": family,
        "architecture": cfg["architectures"][0],
        "stage": stage,
        "dtype": dtype_name,
        "files": [*files, "config.json", "generation_config.json", *tok_files],
    }
