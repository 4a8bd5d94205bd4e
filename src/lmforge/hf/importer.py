"""A Hugging Face model directory -> an lmforge stage checkpoint.

`import_hf(dir)` returns a `StageCheckpoint` like `lmforge.training.checkpoint.load_checkpoint` does
(stage "pretrain" for a causal LM, "reward" for a one-label sequence classifier; state-dict
keys `model.backbone.*`, `model.lm_head.weight`, `model.head.*`; the tokenizer with its special
tokens and chat template), so `init_from=<HF dir>` needs only the dispatch in `load_any_checkpoint` below.
Its state dict is lazy: weights are read from the memory-mapped safetensors when used.

`import_to_dir(dir, out)` writes that checkpoint as `<out>/lmforge.ckpt` plus
`<out>/conf/model/<name>.yaml`, the `model=` config for `train.py --config-dir <out>/conf`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lmforge.data.hf_tokenizer import load_hf_tokenizer
from lmforge.hf.hf_config import UnsupportedModelError, hf_to_model_config
from lmforge.hf.weights import LazyHFState, SafetensorsDir

CHECKPOINT_NAME = "lmforge.ckpt"


def is_hf_model_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return json.loads(path.read_text())


def _head(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        if labels != 1:
            raise UnsupportedModelError(
                f"{archs}: a sequence classifier with {labels} labels; lmforge imports reward models with one"
            )
        return "score"
    other = [a for a in archs if not a.endswith(("ForCausalLM", "LMHeadModel", "Model"))]
    if other:
        raise UnsupportedModelError(f"architectures {other}: lmforge imports causal LMs and one-label reward models")
    return "lm"


def import_hf(directory: str | Path, *, max_seq_len: int | None = None):
    """The StageCheckpoint of an HF model directory (see the module docstring)."""
    from lmforge.training.checkpoint import FORMAT_VERSION, StageCheckpoint

    directory = Path(directory)
    hf = read_hf_config(directory)
    mc = hf_to_model_config(hf, max_seq_len=max_seq_len)
    head = _head(hf)
    state = LazyHFState(SafetensorsDir(directory), mc, hf["model_type"], head)
    tokenizer = load_hf_tokenizer(directory, hf)
    stage = "reward" if head == "score" else "pretrain"
    meta = {
        "format": FORMAT_VERSION,
        "stage": stage,
        "model_config": asdict(mc),
        "tokenizer": torch.frombuffer(bytearray(tokenizer.proto()), dtype=torch.uint8),
        "config": {"model": asdict(mc)},
        "lineage": {"imported_from": str(directory.resolve())},
        "hf": {"model_type": hf["model_type"], "architectures": hf.get("architectures"), "config": hf},
    }
    return StageCheckpoint(directory, stage, mc, tokenizer, state, meta, {"state_dict": state, "lmforge": meta})


def model_yaml(mc, comment: str) -> str:
    """A conf/model/*.yaml for `mc` (same layout as the shipped ones)."""
    lines = [f"# {comment}", "defaults:", "  - model_schema", "  - _self_", ""]
    for key, value in asdict(mc).items():
        lines.append(f"{key}: {json.dumps(value) if isinstance(value, str) else _yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)  # YAML 1.1 reads 1e-06 as a string: write 1.0e-06
        mantissa, e, exponent = text.partition("e")
        return (mantissa if "." in mantissa or not mantissa[-1:].isdigit() else mantissa + ".0") + e + exponent
    return str(value)


def config_name(directory: Path) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", directory.resolve().name.lower()).strip("-") or "imported"


def import_to_dir(
    directory: str | Path, out: str | Path, *, max_seq_len: int | None = None, name: str | None = None,
    weights: bool = True,
) -> dict[str, str]:  # fmt: skip
    """Write `<out>/lmforge.ckpt` (unless weights=False) and `<out>/conf/model/<name>.yaml`.
    Peak memory is about one copy of the weights (torch.save writes the whole dict)."""
    directory, out = Path(directory), Path(out)
    hf = read_hf_config(directory)
    mc, head = hf_to_model_config(hf, max_seq_len=max_seq_len), _head(hf)  # config errors before any reading
    name = name or config_name(directory)
    conf = out / "conf" / "model" / f"{name}.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(model_yaml(mc, f"{name}: {hf['model_type']} {hf.get('architectures')} imported from {directory}"))
    written = {"model_config": str(conf), "stage": "reward" if head == "score" else "pretrain"}
    chat = _write_chat_config(directory, hf, out / "conf" / "chat" / f"{name}.yaml")
    if chat:
        written["chat_config"] = chat
    if weights:
        ckpt = import_hf(directory, max_seq_len=max_seq_len)
        path = out / CHECKPOINT_NAME
        state = dict(ckpt.state_dict.items())  # reads the weights, one tensor at a time
        _atomic_save({"state_dict": state, "lmforge": ckpt.meta}, path)
        written["checkpoint"] = str(path)
    return written


def _write_chat_config(directory: Path, hf: dict[str, Any], path: Path) -> str | None:
    """`+chat=<name>`: data.prompt_template rendered from the model's chat template (one user
    turn, then the assistant's turn opening), data.response_prefix "". None without one."""
    from lmforge.data.hf_tokenizer import HFTokenizer, TokenizerImportError, prompt_template_from_chat

    try:
        tokenizer = load_hf_tokenizer(directory, hf)
    except (TokenizerImportError, FileNotFoundError):
        return None
    if not isinstance(tokenizer, HFTokenizer) or tokenizer.chat_template is None:
        return None
    template = prompt_template_from_chat(tokenizer)
    # JSON strings are YAML double-quoted scalars; `\${` keeps OmegaConf from interpolating.
    quoted = json.dumps(template.replace("${", "\\${"), ensure_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# @package _global_\n# The chat format of {directory}: train.py ... +chat={path.stem}\n"
        f'data:\n  prompt_template: {quoted}\n  response_prefix: ""\n'
    )
    return str(path)


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_hf_checkpoint(path: str | Path):
    """A directory given as init_from: one `import` wrote (lmforge.ckpt inside), or an HF model
    directory read directly."""
    from lmforge.training.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if (path / CHECKPOINT_NAME).is_file():
        return load_checkpoint(path / CHECKPOINT_NAME)
    if is_hf_model_dir(path):
        return import_hf(path)
    raise CheckpointError(
        f"{path}: a directory without {CHECKPOINT_NAME} or config.json; give a checkpoint file, a directory "
        "written by `python -m lmforge.convert import`, or a Hugging Face model directory"
    )


def load_any_checkpoint(path: str | Path, mmap: bool = False):
    """What `init_from=`, `ckpt=` and a reward source's `path=` accept: a stage checkpoint file,
    a folder `python -m lmforge.convert import` wrote, or a Hugging Face model folder."""
    from lmforge.training.checkpoint import load_checkpoint

    if Path(path).is_dir():
        return load_hf_checkpoint(path)
    return load_checkpoint(path, mmap=mmap)
