"""The decoder-only Transformer, its heads and batched generation."""

from lmforge.model.generation import GenerationOutput, filter_logits, generate, sample_from_logits
from lmforge.model.heads import CausalLM, ScalarModel, gather_last, last_token_index
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import ModelConfig, ModelConfigError, Transformer

__all__ = [
    "CausalLM",
    "GenerationOutput",
    "KVCache",
    "ModelConfig",
    "ModelConfigError",
    "ScalarModel",
    "Transformer",
    "filter_logits",
    "gather_last",
    "generate",
    "last_token_index",
    "sample_from_logits",
]
