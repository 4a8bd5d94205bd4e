"""Hugging Face interop: import HF checkpoints (Llama, Mistral, Qwen2, SmolLM, TinyLlama,
GPT-2) into lmforge's backbone and export lmforge checkpoints back to HF format.

    config.py     config.json <-> ModelConfig, supported families, refusals by name
    weights.py    safetensors <-> lmforge state dicts (fused qkv, Conv1D transposes, shards)
    tokenizer.py  HFTokenizer (tokenizer.json + chat template), tokenizer export/import
    importer.py   HF directory -> StageCheckpoint / lmforge.ckpt + conf/model yaml
    exporter.py   lmforge checkpoint -> HF directory

Training never imports this package; `tokenizers` is needed only for HF tokenizers and
`transformers` only to convert a tokenizer.model that comes without tokenizer.json.
The command line is `python -m lmforge.convert`.
"""

from lmforge.data.hf_tokenizer import HFTokenizer, tokenizer_from_bytes
from lmforge.hf.exporter import export_hf
from lmforge.hf.hf_config import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from lmforge.hf.importer import import_hf, import_to_dir, is_hf_model_dir, load_hf_checkpoint

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFTokenizer",
    "UnsupportedModelError",
    "export_hf",
    "import_hf",
    "import_to_dir",
    "is_hf_model_dir",
    "load_hf_checkpoint",
    "tokenizer_from_bytes",
]
