"""Reading lmforge checkpoints safely and handing weights from one stage to the next.

A checkpoint is a Lightning `.ckpt` plus an `lmforge` entry (stage, model config, tokenizer,
resolved run config, lineage). It is read with `torch.load(weights_only=True)`: a checkpoint
that smuggles code in a pickle is refused, never executed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import torch

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
    tokenizer: Tokenizer
    state_dict: dict[str, torch.Tensor]  # the LightningModule's, keys like `model.backbone.…`
    meta: dict[str, Any]
    raw: dict[str, Any]


def load_checkpoint(path: str | Path) -> StageCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a safe checkpoint"
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). It is truncated, not a lmforge checkpoint, or "
            "contains pickled code, which lmforge refuses to execute."
        ) from None
    meta = raw.get("lmforge") if isinstance(raw, dict) else None
    if not meta:
        raise CheckpointError(f"{path}: not a lmforge checkpoint (no 'lmforge' metadata entry)")
    known = {f.name for f in fields(ModelConfig)}
    mc = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
    tokenizer = Tokenizer.from_proto(meta["tokenizer"].numpy().tobytes())
    return StageCheckpoint(path, meta["stage"], mc, tokenizer, raw["state_dict"], meta, raw)


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (e.g. 'model.backbone')."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}


def check_compatible(ckpt: StageCheckpoint, model_cfg: ModelConfig, what: str = "init_from") -> None:
    """Refuse, naming every differing field, a checkpoint whose shape differs from the config."""
    a, b = asdict(ckpt.model_config), asdict(model_cfg)
    shape_keys = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size", "norm", "pos",
                  "activation", "bias", "tie_embeddings")
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
