"""Pretraining data: documents -> tokenizer -> memory-mapped token stream -> fixed-length windows.

Windows are sampled *statelessly*: the window of sample number k is a pure function of
(seed, k). The sample a rank reads at optimizer step s is therefore known from s alone, so a
resumed run reads exactly the batches the uninterrupted run would have read, with no sampler
state to save, and ranks read distinct samples (k = i * world_size + rank).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lmforge.data.config import DataConfig, use_pinned_memory
from lmforge.data.sources import (
    Document,
    corpus_fingerprint,
    read_jsonl,
    read_text_files,
    synthetic_documents,
)
from lmforge.data.tokenized import TokenDataset, build_token_dataset
from lmforge.data.tokenizer import Tokenizer, train_tokenizer
from lmforge.errors import DataError

log = logging.getLogger(__name__)

# Bump when the synthetic world's generator changes, so cached token files are rebuilt.
SYNTHETIC_VERSION = "1"


def documents_for(cfg: DataConfig) -> Iterator[Document]:
    """The pretraining documents of the configured source (conf/data/<source>.yaml)."""
    if cfg.source == "synthetic":
        return synthetic_documents(cfg.seed, cfg.n_docs, cfg.wrong_rate)
    if cfg.source == "text":
        return read_text_files(list(cfg.paths), clean_html=cfg.clean_html, collapse_whitespace=cfg.collapse_whitespace)
    if cfg.source in ("jsonl", "hh"):
        return read_jsonl(
            cfg.path,
            text_field=cfg.text_field,
            clean_html=cfg.clean_html,
            collapse_whitespace=cfg.collapse_whitespace,
        )
    raise DataError(f"data.source={cfg.source!r} has no pretraining text: use synthetic, text or jsonl")


def source_key(cfg: DataConfig) -> str:
    """A key that changes whenever the documents `documents_for(cfg)` yields can change."""
    if cfg.source == "synthetic":
        parts = ["synthetic", SYNTHETIC_VERSION, cfg.seed, cfg.n_docs, cfg.wrong_rate]
    elif cfg.source == "text":
        parts = ["text", corpus_fingerprint(list(cfg.paths)), cfg.clean_html, cfg.collapse_whitespace]
    else:
        parts = [
            cfg.source,
            corpus_fingerprint([cfg.path]),
            cfg.text_field,
            cfg.clean_html,
            cfg.collapse_whitespace,
        ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def load_or_train_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by data.tokenizer.path, else one trained on the source (cached by key)."""
    if cfg.tokenizer.path:
        path = Path(cfg.tokenizer.path)
        if not path.is_file():
            raise DataError(f"data.tokenizer.path={path}: no such file")
        return Tokenizer.load(path)
    texts = (d.text for d in islice(documents_for(cfg), cfg.tokenizer.max_train_docs))
    return train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.cache_dir, model_type=cfg.tokenizer.model_type)


def splitmix64(x: int) -> int:
    """A fast, well-mixed 64-bit integer hash (Steele et al.), the basis of stateless sampling."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def window(tokens: np.ndarray, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[start:start+T] and next-token targets tokens[start+1:start+T+1]."""
    chunk = torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64))
    return chunk[:-1], chunk[1:]


class RandomWindows(IterableDataset):
    """An endless stream of windows; sample k starts at splitmix64(seed, k) mod (N - T - 1)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, start_sample: int, rank: int, world_size: int):
        if len(tokens) < seq_len + 2:
            raise DataError(
                f"the training split has {len(tokens)} tokens, fewer than one window of "
                f"algo.seq_len={seq_len}: use more data or a shorter algo.seq_len"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.start_sample, self.rank, self.world_size = start_sample, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        span = len(self.tokens) - self.seq_len - 1
        # Local sample i of this rank is global sample i * world_size + rank; DataLoader workers
        # take turns (worker w yields i = start + w, start + w + n_workers, ...), and the loader
        # interleaves workers in order, so batches keep the order of i.
        i = self.start_sample + worker
        while True:
            k = i * self.world_size + self.rank
            yield window(self.tokens, splitmix64(self.seed * 0x100000001 + k) % span, self.seq_len)
            i += n_workers


class ContiguousWindows(Dataset):
    """Validation: consecutive non-overlapping windows from the start of the split, a fixed set."""

    def __init__(self, tokens: np.ndarray, seq_len: int, max_windows: int):
        n = (len(tokens) - 1) // seq_len
        if n < 1:
            raise DataError(
                f"the validation split has {len(tokens)} tokens, fewer than one window of "
                f"algo.seq_len={seq_len}: raise data.val_fraction or shorten algo.seq_len"
            )
        self.tokens, self.seq_len, self.n = tokens, seq_len, min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return window(self.tokens, i * self.seq_len, self.seq_len)


@dataclass
class PretrainBatching:
    batch_size: int  # micro-batch per rank
    seq_len: int
    val_batches: int
    seed: int


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, batching: PretrainBatching, tokenizer: Tokenizer):
        super().__init__()
        self.cfg, self.batching, self.tokenizer = cfg, batching, tokenizer
        self.tokens: TokenDataset | None = None

    def prepare_data(self) -> None:
        self.tokens = self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.tokens is None:
            self.tokens = self._build()

    def _build(self) -> TokenDataset:
        return build_token_dataset(
            documents_for(self.cfg),
            self.tokenizer,
            self.cfg.cache_dir,
            key=source_key(self.cfg),
            val_fraction=self.cfg.val_fraction,
            num_workers=self.cfg.preprocess_workers,
        )

    @property
    def bytes_per_token(self) -> float:
        meta = self.tokens.meta
        return meta["n_bytes_val"] / max(1, meta["n_tokens_val"])

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Samples this rank has already consumed: resume reads on from exactly there.
        start = trainer.global_step * trainer.accumulate_grad_batches * self.batching.batch_size
        ds = RandomWindows(
            self.tokens.train,
            self.batching.seq_len,
            self.batching.seed,
            start,
            trainer.global_rank,
            trainer.world_size,
        )
        return DataLoader(
            ds,
            batch_size=self.batching.batch_size,
            num_workers=self.cfg.num_workers,
            pin_memory=use_pinned_memory(self.cfg),
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        b = self.batching
        ds = ContiguousWindows(self.tokens.val, b.seq_len, b.val_batches * b.batch_size)
        return DataLoader(ds, batch_size=b.batch_size, shuffle=False, num_workers=0)
