"""Helpers of the HF tests: tiny random Hugging Face models and tokenizers, built in the tests
(never downloaded).

Fixtures import transformers / tokenizers lazily through pytest.importorskip, so without the
`hf` extra the tests that need them skip with the reason, and the others still run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 320  # model vocabulary; the test tokenizer has fewer tokens (a model may have spare rows)
TOKENIZER_VOCAB = 300
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MULTILINGUAL = (
    "The quick brown fox  jumps over the lazy dog.\n"
    "大规模语言模型是一种深度学习的算法。\n"
    "def f(x):\n\treturn x ** 2  # square\n"
    "Launch 🚀 went well 👍🏽 — 😀\n"
)


def hf_transformers():
    return pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def bpe_tokenizer_files() -> dict[str, str]:
    """A byte-level BPE (GPT-2 / Qwen2 style) trained here, with ChatML special tokens."""
    tk = pytest.importorskip("tokenizers", reason="the hf extra (tokenizers) is not installed")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([MULTILINGUAL] * 20, trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def write_files(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from HF's tiny init, so attention is not uniform and a mis-mapped tensor
    shows: norms ~1 +- 0.2, everything else ~N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_norm else 0.2 * noise)
    return model.eval()


def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rms_norm_eps=1e-6, **kw)  # fmt: skip


def family_configs():
    """name -> (transformers config class name, kwargs): every family and option the importer maps."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}  # fmt: skip
    return {
        # Llama 3.1 style: GQA, untied, theta 5e5, llama3 RoPE scaling active at these lengths.
        "llama": (
            "LlamaConfig",
            _common(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=llama3),
        ),
        # SmolLM / TinyLlama style: tied embeddings, plain multi-head attention, linear scaling.
        "llama-tied": (
            "LlamaConfig",
            _common(
                num_key_value_heads=4, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
            ),
        ),
        "mistral": (
            "MistralConfig",
            _common(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, head_dim=8),
        ),
        "qwen2": ("Qwen2Config", _common(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)),
        "qwen2-tied": ("Qwen2Config", _common(num_key_value_heads=1, tie_word_embeddings=True)),
        "gpt2": (
            "GPT2Config",
            dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        ),
        "gpt2-untied": (
            "GPT2Config",
            dict(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
                tie_word_embeddings=False,
            ),
        ),
    }


def build_hf_model(name: str, directory: Path, *, head: str = "lm", dtype=torch.float32, seed: int = 0, **save_kw):
    """Save a sharpened random model of family `name` with the test tokenizer to `directory`;
    return the (fp32, eval) transformers model."""
    transformers = hf_transformers()
    cls_name, kwargs = family_configs()[name]
    config = getattr(transformers, cls_name)(**kwargs)
    prefix = cls_name.removesuffix("Config")
    if head == "score":
        config.num_labels = 1
        config.pad_token_id = 0
        model_cls = getattr(transformers, f"{prefix}ForSequenceClassification")
    else:
        model_cls = getattr(transformers, "GPT2LMHeadModel" if prefix == "GPT2" else f"{prefix}ForCausalLM")
    torch.manual_seed(seed)
    model = sharpen(model_cls(config), seed)
    model.to(dtype).save_pretrained(str(directory), **save_kw)
    write_files(directory, bpe_tokenizer_files())
    return model.float().eval() if dtype != torch.float32 else model


def left_padded_batch(seed: int = 1, T: int = 14, pads=(0, 5, 9)):
    """(B, T) ids and mask: rows with 0, 5 and 9 pad columns on the left."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TOKENIZER_VOCAB, (len(pads), T), generator=gen)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """lmforge's positions (count from each row's first real token), for transformers."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
