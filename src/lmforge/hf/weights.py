"""Hugging Face safetensors weights <-> lmforge state dicts.

One table (`layout`) says, for every lmforge parameter, which HF tensors hold it and how:

* "copy": the same tensor under another name;
* "cat": lmforge fuses q, k, v into `attn.qkv` -- rows [q; k; v] (H*D, then Hkv*D, then
  Hkv*D rows: the split in CausalSelfAttention.forward) -- so import concatenates the HF
  q_proj/k_proj/v_proj rows and export splits them back;
* "t": GPT-2's Conv1D stores (in, out), nn.Linear (out, in): a transpose each way. Its
  c_attn is already [q | k | v] along `out`, so the transpose is the fused qkv.

HF Llama-family q/k weights are in the "rotate half" RoPE layout (transformers permutes Meta's
interleaved weights when converting them), which is lmforge's: no permutation here.

Import and export both walk this one table, so import -> export gives back the very tensors
(names, dtypes, bytes). Tensors are read one at a time from memory-mapped files
(`safetensors.safe_open`) and never cast: bf16 stays bf16, and converting a 7B model needs
about one copy of its weights in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmforge.hf.hf_config import UnsupportedModelError
from lmforge.model import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Buffers some checkpoints carry that are not weights: old rotary tables, GPT-2's causal masks.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)h\.\d+\.attn\.(masked_)?bias$")


@dataclass(frozen=True)
class Entry:
    lmforge: str  # key in the CausalLM / ScalarModel state dict (`backbone.…`, `lm_head.weight`, `head.weight`)
    hf: tuple[str, ...]  # key(s) in the HF checkpoint
    op: str = "copy"  # "copy" | "cat" (rows of q, k, v) | "t" (Conv1D transpose)


def layout(mc: ModelConfig, model_type: str, head: str, prefix: str | None = None) -> list[Entry]:
    """Every lmforge tensor of a model with `head` ("lm" or "score") and its HF source.

    prefix: the HF base-model prefix ("model." / "transformer." as saved by the *ForCausalLM
    classes; "" for checkpoints saved from the bare base model)."""
    gpt2 = model_type == "gpt2"
    p = ("transformer." if gpt2 else "model.") if prefix is None else prefix
    entries: list[Entry] = [Entry("backbone.wte.weight", (p + ("wte.weight" if gpt2 else "embed_tokens.weight"),))]
    if gpt2:
        entries.append(Entry("backbone.wpe.weight", (p + "wpe.weight",)))
    for i in range(mc.n_layer):
        b, h = f"backbone.blocks.{i}.", (f"{p}h.{i}." if gpt2 else f"{p}layers.{i}.")
        if gpt2:
            for suffix in ("weight", "bias"):
                conv = "t" if suffix == "weight" else "copy"  # Conv1D weights are (in, out)
                entries += [
                    Entry(f"{b}norm1.{suffix}", (f"{h}ln_1.{suffix}",)),
                    Entry(f"{b}attn.qkv.{suffix}", (f"{h}attn.c_attn.{suffix}",), conv),
                    Entry(f"{b}attn.out_proj.{suffix}", (f"{h}attn.c_proj.{suffix}",), conv),
                    Entry(f"{b}norm2.{suffix}", (f"{h}ln_2.{suffix}",)),
                    Entry(f"{b}mlp.up.{suffix}", (f"{h}mlp.c_fc.{suffix}",), conv),
                    Entry(f"{b}mlp.down.{suffix}", (f"{h}mlp.c_proj.{suffix}",), conv),
                ]
            continue
        a = h + "self_attn."
        entries += [
            Entry(b + "norm1.weight", (h + "input_layernorm.weight",)),
            Entry(b + "attn.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "cat"),
            Entry(b + "attn.out_proj.weight", (a + "o_proj.weight",)),
            Entry(b + "norm2.weight", (h + "post_attention_layernorm.weight",)),
            Entry(b + "mlp.gate.weight", (h + "mlp.gate_proj.weight",)),
            Entry(b + "mlp.up.weight", (h + "mlp.up_proj.weight",)),
            Entry(b + "mlp.down.weight", (h + "mlp.down_proj.weight",)),
        ]
        if mc.bias or mc.qkv_bias:
            entries.append(Entry(b + "attn.qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "cat"))
        if mc.bias:
            entries += [
                Entry(b + "attn.out_proj.bias", (a + "o_proj.bias",)),
                Entry(b + "mlp.gate.bias", (h + "mlp.gate_proj.bias",)),
                Entry(b + "mlp.up.bias", (h + "mlp.up_proj.bias",)),
                Entry(b + "mlp.down.bias", (h + "mlp.down_proj.bias",)),
            ]
    entries.append(Entry("backbone.norm_f.weight", (p + ("ln_f.weight" if gpt2 else "norm.weight"),)))
    if gpt2:
        entries.append(Entry("backbone.norm_f.bias", (p + "ln_f.bias",)))
    if head == "score":
        entries.append(Entry("head.weight", ("score.weight",)))
    elif not mc.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head.weight",)))
    return entries


def _qkv_rows(mc: ModelConfig) -> list[int]:
    return [mc.n_head * mc.head_dim, mc.n_kv_head * mc.head_dim, mc.n_kv_head * mc.head_dim]


# ============================================================================ reading


class SafetensorsDir:
    """The tensors of an HF model directory, opened lazily: `model.safetensors`, or the shards
    named by `model.safetensors.index.json`, or every `*.safetensors` file there."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = (
                [SINGLE] if (self.dir / SINGLE).is_file() else sorted(p.name for p in self.dir.glob("*.safetensors"))
            )
            weight_map = None
        if not files:
            found = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
            hint = (
                " It has PyTorch pickle weights (*.bin), which lmforge does not read: they can run code when "
                "loaded. Convert them to safetensors first (transformers: `from_pretrained(dir)."
                "save_pretrained(out, safe_serialization=True)`)."
                if any(n.endswith(".bin") for n in found)
                else ""
            )
            raise FileNotFoundError(f"{self.dir}: no *.safetensors weights (found {found[:10]}).{hint}")
        self._handles = {name: safe_open(self.dir / name, framework="pt", device="cpu") for name in files}
        if weight_map is None:
            weight_map = {k: name for name, h in self._handles.items() for k in h.keys()}
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> Tensor:
        return self._handles[self.weight_map[key]].get_tensor(key)

    def dtype_of(self, key: str) -> torch.dtype:
        return self.get(key).dtype


def base_prefix(keys: list[str], model_type: str) -> str:
    """How the base model's keys start in this checkpoint ("model.", "transformer." or "")."""
    probe = "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"
    for prefix in ("transformer.", "") if model_type == "gpt2" else ("model.", ""):
        if prefix + probe in keys:
            return prefix
    raise UnsupportedModelError(f"no {probe} in the weights: this is not a {model_type} checkpoint")


def _check_keys(weights: SafetensorsDir, entries: list[Entry], mc: ModelConfig, model_type: str) -> None:
    """Every HF tensor must have a place: an unexpected one means a variant (extra norms,
    biases) this import does not compute, which must not be dropped silently."""
    keys = weights.keys()
    needed = {k for e in entries for k in e.hf}
    missing = sorted(needed - set(keys))
    if missing:
        raise UnsupportedModelError(f"{weights.dir}: missing weights {missing[:5]} for a {model_type} model")
    unused = sorted(k for k in set(keys) - needed if not _IGNORED.search(k))
    if mc.tie_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if unused:
        raise UnsupportedModelError(
            f"{weights.dir}: weights {unused[:5]} have no place in lmforge's {model_type} model "
            "(an architecture variant this importer does not know)"
        )


# ============================================================================ writing


def lmforge_to_hf(
    state: dict[str, Tensor], mc: ModelConfig, model_type: str, head: str
) -> Iterator[tuple[str, Tensor]]:
    """(HF key, tensor) pairs of an lmforge state dict, one at a time and in layer order. The
    tensors may be views of `state`'s; clone before handing them to safetensors."""
    for e in layout(mc, model_type, head):
        if e.lmforge not in state:
            raise KeyError(f"the checkpoint has no {e.lmforge} (needed for {e.hf[0]})")
        t = state[e.lmforge]
        if e.op == "cat":
            rows = _qkv_rows(mc)
            if t.shape[0] != sum(rows):
                raise ValueError(f"{e.lmforge} has {t.shape[0]} rows, expected {sum(rows)}")
            yield from zip(e.hf, torch.split(t, rows, dim=0))
        elif e.op == "t":
            yield e.hf[0], t.t()
        else:
            yield e.hf[0], t


class LazyHFState(Mapping):
    """An lmforge state dict over HF files, converting each tensor when it is read: a caller
    that only wants the tokenizer or the keys reads no weights, and `load_state_dict` reads
    them one by one. Keys carry `prefix` (the LightningModule's "model.")."""

    def __init__(self, weights: SafetensorsDir, mc: ModelConfig, model_type: str, head: str, prefix: str = "model."):
        keys = weights.keys()
        entries = layout(mc, model_type, head, base_prefix(keys, model_type))
        _check_keys(weights, entries, mc, model_type)
        self._weights, self._mc = weights, mc
        self._entries = {prefix + e.lmforge: e for e in entries}
        self._head_bias = prefix + "head.bias" if head == "score" else None

    def __getitem__(self, key: str) -> Tensor:
        if key == self._head_bias:  # HF's `score` has no bias; lmforge's head starts it at 0
            return torch.zeros(1, dtype=self._weights.dtype_of("score.weight"))
        e = self._entries[key]
        parts = [self._weights.get(k) for k in e.hf]
        if e.op == "cat":
            return torch.cat(parts, dim=0)
        if e.op == "t":
            return parts[0].t().contiguous()
        return parts[0]

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        if self._head_bias:
            yield self._head_bias

    def __len__(self) -> int:
        return len(self._entries) + (self._head_bias is not None)


def save_safetensors(tensors: Iterator[tuple[str, Tensor]], out: Path, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `model.safetensors`, or shards of at most max_shard_bytes (one tensor may exceed
    it) plus `model.safetensors.index.json`, as transformers' save_pretrained names them.
    Only one shard's tensors are in memory at a time. Returns the files written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        # A shard's name needs the shard count: write to temporary names, rename at the end.
        name = f".shard-{len(files):05d}.tmp"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        files.append(name)
        for k in shards[-1]:
            weight_map[k] = name
        shards[-1], sizes[-1] = {}, 0

    for key, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + n > max_shard_bytes:
            flush()
        # clone: safetensors refuses views sharing one storage (the split qkv), and a transposed
        # or memory-mapped tensor becomes one compact, owned block.
        shards[-1][key] = t.detach().clone(memory_format=torch.contiguous_format)
        sizes[-1] += n
        total += n
    if shards[-1] or not files:
        flush()
    if len(files) == 1:
        (out / files[0]).replace(out / SINGLE)
        return [SINGLE]
    names = {tmp: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, tmp in enumerate(files)}
    for tmp, name in names.items():
        (out / tmp).replace(out / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names.values(), INDEX]
