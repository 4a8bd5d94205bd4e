"""Reading lmforge checkpoints safely and handing weights from one stage to the next.

A checkpoint is a Lightning `.ckpt` plus an `lmforge` entry (stage, model config, tokenizer,
resolved run config, lineage). It is read with `torch.load(weights_only=True)`: a checkpoint
that smuggles code in a pickle is refused, never executed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lmforge.data.hf_tokenizer import HFTokenizer, tokenizer_from_bytes  # imports `tokenizers` only for HF blobs
from lmforge.data.tokenizer import Tokenizer
from lmforge.model import ModelConfig

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked, with what to do about it."""


@dataclass
class StageCheckpoint:
    path: Path
    stage: str
    model_config: ModelConfig
    tokenizer: Tokenizer | HFTokenizer
    state_dict: dict[str, torch.Tensor]  # the LightningModule's, keys like `model.backbone.…`
    meta: dict[str, Any]
    raw: dict[str, Any]


def load_checkpoint(path: str | Path, mmap: bool = False) -> StageCheckpoint:
    """Read a checkpoint file with weights_only=True (mmap: tensors are paged in only when used).
    A folder (a Hugging Face model, or one `python -m lmforge.convert import` wrote) is read one
    layer up, by `lmforge.hf.importer.load_any_checkpoint`, which every `init_from=`/`ckpt=` uses."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: a folder, not a checkpoint file; Hugging Face and `convert import` folders are read "
            "by lmforge.hf.importer.load_any_checkpoint"
        )
    raw = safe_torch_load(path, map_location="cpu", mmap=mmap)
    meta = raw.get("lmforge") if isinstance(raw, dict) else None
    if not meta:
        raise CheckpointError(f"{path}: not a lmforge checkpoint (no 'lmforge' metadata entry)")
    known = {f.name for f in fields(ModelConfig)}
    mc = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
    tokenizer = tokenizer_from_bytes(meta["tokenizer"].numpy().tobytes(), source=str(path))
    return StageCheckpoint(path, meta["stage"], mc, tokenizer, raw.get("state_dict", {}), meta, raw)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only, never code.

    Raises CheckpointError naming the file when it is truncated, not a
    checkpoint, or contains pickled objects (which are refused, not executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable checkpoint"
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint with weights_only=True ({type(e).__name__}: {first}). "
            "It is truncated, not a lmforge checkpoint, or contains pickled code, which lmforge refuses "
            "to execute."
        ) from None


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (e.g. 'model.backbone')."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}


def check_compatible(ckpt: StageCheckpoint, model_cfg: ModelConfig, what: str = "init_from") -> None:
    """Refuse, naming every differing field, a checkpoint whose shape differs from the config."""
    a, b = asdict(ckpt.model_config), asdict(model_cfg)
    shape_keys = (
        "n_layer",
        "n_head",
        "n_kv_head",
        "d_model",
        "d_ff",
        "vocab_size",
        "norm",
        "pos",
        "activation",
        "bias",
        "qkv_bias",
        "tie_embeddings",
    )
    diffs = [f"model.{k}: checkpoint {a[k]!r} vs config {b[k]!r}" for k in shape_keys if a[k] != b[k]]
    if diffs:
        raise CheckpointError(
            f"{what}={ckpt.path} was trained with a different model shape:\n  "
            + "\n  ".join(diffs)
            + f"\nUse the model config it was trained with (its stage: {ckpt.stage})."
        )


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) that names missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    bad_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad_shape or missing or unexpected:
        lines = [f"{source} does not match the model:"]
        lines += [f"  shape mismatch {s}" for s in bad_shape[:10]]
        lines += [f"  missing {k}" for k in missing[:10]]
        lines += [f"  unexpected {k}" for k in unexpected[:10]]
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=True)


# Checkpoint stages that hold a language model (backbone + LM head) a policy can start from or
# sample: every stage but the reward model's (a scalar head).
POLICY_STAGES = ("pretrain", "sft", "dpo", "ppo", "reinforce", "rloo", "grpo")


def require_stage(ckpt: StageCheckpoint, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if ckpt.stage not in allowed:
        raise CheckpointError(
            f"{what}={ckpt.path} is a '{ckpt.stage}' checkpoint; this needs one of {allowed}. "
            + (
                "A reward model has a scalar head, not a language-model head: give the SFT "
                "(or pretraining) checkpoint instead."
                if ckpt.stage == "reward"
                else ""
            )
        )


# Settings that decide which samples a step reads: resuming with others changes the data order.
DATA_ORDER_KEYS = (
    "seed",
    "algo.batch_size",
    "algo.seq_len",
    "algo.rollout_batch_size",
    "trainer.accumulate_grad_batches",
    "data.source",
    "data.seed",
    "data.n_docs",
    "data.path",
    "data.paths",
    "data.db",
    "data.val_fraction",
)


def _get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def check_resume(ckpt: StageCheckpoint, cfg: Any, model_cfg: ModelConfig) -> list[str]:
    """Refuse a checkpoint this run cannot continue (another stage, model shape or tokenizer);
    return the data-order settings that differ from the checkpoint's run (a warning: the resumed
    run would read other data than the original one would have)."""
    algo = cfg.algo.name
    if ckpt.stage != algo:
        hint = (
            f" To start algo={algo} from those weights, use init_from={ckpt.path} (and no resume)."
            if ckpt.stage in ("pretrain", "sft") and algo != "pretrain"
            else ""
        )
        raise CheckpointError(
            f"resume={ckpt.path} is a '{ckpt.stage}' checkpoint, but this run is algo={algo}: resume continues "
            f"the same stage (run algo={ckpt.stage} to continue it).{hint}"
        )
    check_compatible(ckpt, model_cfg, what="resume")
    from omegaconf import DictConfig, OmegaConf

    old = ckpt.meta.get("config") or {}
    now = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return [
        f"{k}: checkpoint {_get(old, k)!r} vs now {_get(now, k)!r}"
        for k in DATA_ORDER_KEYS
        if _get(old, k) != _get(now, k)
    ]
