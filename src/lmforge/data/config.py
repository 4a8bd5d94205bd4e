"""Typed schemas of the `data` config group (conf/data/*.yaml).

One dataclass per kind of source. Every stage reads the fields it needs from the same
source: `synthetic` serves pretraining text, SFT pairs, preference pairs and RL prompts;
`jsonl` names the fields of each record kind, so `algo=reward data=jsonl data.path=x.jsonl`
works as well as `algo=pretrain data=jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING


@dataclass
class TokenizerConfig:
    # Defined once by the model and interpolated here: the tokenizer is trained to the model's
    # vocabulary size (sentencepiece may come out smaller on a small corpus; never larger).
    vocab_size: int = "${model.vocab_size}"  # type: ignore[assignment]
    model_type: str = "bpe"  # bpe | unigram
    # An existing sentencepiece model file to use instead of training one.
    path: Optional[str] = None
    # At most this many documents feed tokenizer training (sentencepiece holds them in memory).
    max_train_docs: int = 200_000


@dataclass
class DataConfig:
    source: str = MISSING
    # Tokenizers and token files are cached here by a key of their inputs and reused.
    cache_dir: str = "${oc.env:LMFORGE_CACHE,.cache/lmforge}"
    val_fraction: float = 0.05
    # DataLoader worker processes (0 = load in the training process; the token files are
    # memory-mapped, so a worker rarely pays off on a CPU).
    num_workers: int = 0
    # Page-locked host batches, so the (non-blocking) copy to the GPU overlaps compute.
    # null: on when a GPU is present. Pinning needs an accelerator.
    pin_memory: Optional[bool] = None
    # Tokenization parallelism when building the token files.
    preprocess_workers: int = 2
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Prompt template for instruction data: how a prompt and a response are joined.
    # `{prompt}` is replaced by the prompt; the response follows the rendered prompt directly,
    # then EOS. The synthetic world uses the same template.
    prompt_template: str = "User: {prompt}\nAssistant:"
    response_prefix: str = " "
    # Bad records (empty fields, identical chosen/rejected, malformed lines):
    # "error" stops with a message naming file and line; "skip" counts and logs them.
    on_bad_record: str = "error"


@dataclass
class SyntheticDataConfig(DataConfig):
    source: str = "synthetic"
    seed: int = 0
    # Pretraining corpus: documents of 1-4 dialogs, a share of them with wrong answers
    # (the flaws that human feedback later fixes).
    n_docs: int = 20_000
    wrong_rate: float = 0.3
    # Instruction (SFT) pairs and preference pairs drawn from the world's train split.
    n_sft: int = 20_000
    n_pairs: int = 20_000
    n_eval: int = 256
    # Simulated annotator: Bradley-Terry noise temperature (0 = always prefers the better one).
    annotator_noise: float = 0.0
    # More training pairs for the reward stage, from a JSONL file of {prompt, chosen, rejected}
    # on the world's training prompts: e.g. the annotator's verdicts on the SFT policy's own
    # samples, written by `python -m lmforge.label`.
    extra_pairs: Optional[str] = None


@dataclass
class TextDataConfig(DataConfig):
    source: str = "text"
    paths: List[str] = MISSING  # files or globs; each file is one document
    clean_html: bool = False
    collapse_whitespace: bool = False


@dataclass
class JsonlDataConfig(DataConfig):
    source: str = "jsonl"
    path: str = MISSING
    val_path: Optional[str] = None  # held-out records; else val_fraction of `path`
    text_field: str = "text"  # pretraining
    prompt_field: str = "prompt"  # SFT, preference pairs, RL prompts
    response_field: str = "response"  # SFT
    chosen_field: str = "chosen"  # preference pairs
    rejected_field: str = "rejected"
    # The seed's cleaning step for raw web text: strip HTML tags, collapse whitespace.
    clean_html: bool = True
    collapse_whitespace: bool = True


@dataclass
class HHDataConfig(JsonlDataConfig):
    """Anthropic HH-RLHF style: `chosen` and `rejected` are whole dialogues sharing a prefix."""

    source: str = "hh"
    clean_html: bool = False
    collapse_whitespace: bool = False
    assistant_marker: str = "\n\nAssistant:"


@dataclass
class FeedbackDataConfig(DataConfig):
    """Preference pairs straight from the feedback app's database (`python -m lmforge.feedback serve`),
    read with the rules of `python -m lmforge.feedback export`."""

    source: str = "feedback"
    db: str = MISSING  # the feedback app's SQLite database (feedback.db)
    # Ties / both-bad as two mirrored pairs (pulling the two rewards together); else left out.
    include_ties: bool = False
    include_both_bad: bool = False
    include_thumbs: bool = True  # up-voted over down-voted responses of the same prompt
    aggregate: str = "all"  # all: every annotator's judgment is a pair | majority: one per item
    annotators: Optional[List[str]] = None  # only these annotators (null: everyone)
    # Held-out pairs are split by prompt hash with val_fraction (DataConfig).


DATA_SCHEMAS = {
    "synthetic": SyntheticDataConfig,
    "text": TextDataConfig,
    "jsonl": JsonlDataConfig,
    "hh": HHDataConfig,
    "feedback": FeedbackDataConfig,
}


def use_pinned_memory(cfg) -> bool:
    """data.pin_memory resolved: null means "when a GPU is present"."""
    import torch

    value = getattr(cfg, "pin_memory", None)
    return torch.cuda.is_available() if value is None else bool(value)
