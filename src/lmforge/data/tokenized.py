"""Tokenize a corpus once into memory-mapped token files, cached by a key of the inputs.

Layout of one dataset, ``<cache_dir>/tokens-<key16>/``::

    train.bin   flat token stream: doc tokens + [EOS], doc tokens + [EOS], ...
    val.bin     same, for the validation documents
    meta.json   dtype, counts (tokens, UTF-8 bytes, documents per split), keys

Tokens are ``uint16`` when the vocabulary fits (< 65536), else ``uint32``.
Documents get no BOS: EOS alone separates them, as in GPT-style pretraining.

Atomicity: a dataset is built in a hidden temp dir next to the final one,
``meta.json`` is written last, and the directory is then renamed into place
with ``os.replace``. A crashed or killed build therefore never leaves a
directory at the final path, and a directory without ``meta.json`` (or whose
files disagree with it) is never loaded. A build that fails leaves any
existing dataset untouched.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lmforge.data.sources import Document
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

# Bump when the file layout or split rule changes, so old caches are rebuilt.
FORMAT_VERSION = 1
# Documents per encode call: big enough to amortize the call, small enough for
# a smooth progress bar and bounded memory.
_CHUNK_DOCS = 2048
_SPLITS = ("train", "val")


@dataclass
class TokenDataset:
    """A built token dataset. ``train``/``val`` are read-only ``np.memmap``s
    (an empty split is a read-only empty array: an empty file cannot be mapped)."""

    dir: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"TokenDataset({str(self.dir)!r}, train={m['n_tokens_train']} tokens/{m['n_docs_train']} docs, "
            f"val={m['n_tokens_val']} tokens/{m['n_docs_val']} docs, dtype={m['dtype']})"
        )


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


# ======================================================================= loading


def load_token_dataset(dir: str | Path) -> TokenDataset:
    """Open a finished dataset directory; DataError if it is missing or inconsistent."""
    dir = Path(dir)
    meta_path = dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{dir}: no meta.json, so this is not a finished token dataset (an interrupted build?); "
            "delete the directory and run again to rebuild it"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        arrays = {split: _open_split(dir / f"{split}.bin", dtype, int(meta[f"n_tokens_{split}"])) for split in _SPLITS}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{meta_path}: unreadable or inconsistent ({exc}); delete {dir} and run again to rebuild it"
        ) from exc
    return TokenDataset(dir=dir, meta=meta, train=arrays["train"], val=arrays["val"])


def _open_split(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    expected = n_tokens * dtype.itemsize
    actual = path.stat().st_size if path.is_file() else -1
    if actual != expected:
        raise ValueError(f"{path.name} has {actual} bytes, meta.json says {n_tokens} tokens = {expected} bytes")
    if n_tokens == 0:
        empty = np.empty(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _try_load(dir: Path, full_key: str) -> TokenDataset | None:
    """The dataset at ``dir`` if it is complete and was built for ``full_key``."""
    if not dir.is_dir():
        return None
    try:
        ds = load_token_dataset(dir)
    except DataError:
        return None
    return ds if ds.meta.get("key") == full_key else None


# ====================================================================== building


def dataset_key(key: str, tokenizer: Tokenizer) -> str:
    """The full cache key: the caller's input key + the tokenizer + the file format."""
    return hashlib.sha256(f"{key}\0{tokenizer.fingerprint}\0{FORMAT_VERSION}".encode()).hexdigest()


def build_token_dataset(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    *,
    key: str,
    val_fraction: float,
    num_workers: int = 2,
    show_progress: bool = True,
) -> TokenDataset:
    """Tokenize ``documents`` into ``<cache_dir>/tokens-<key16>/``, or reuse it.

    ``key`` must change whenever the documents can (see
    ``sources.corpus_fingerprint``); it is combined with the tokenizer's hash,
    so a new tokenizer also rebuilds. On a cache hit ``documents`` is not
    iterated at all.

    The split is by document: a document goes to val when a stable hash of its
    origin falls below ``val_fraction`` (so adding files does not reshuffle the
    others). With >= 2 documents and ``val_fraction > 0`` both splits get at
    least one document. ``num_workers`` is the number of SentencePiece encode
    threads (in-process: no fork/spawn hazards in a process that holds CUDA,
    torch threads or an unguarded ``__main__``); the result is identical for
    any value.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    full_key = dataset_key(key, tokenizer)
    final = cache_dir / f"tokens-{full_key[:16]}"
    cached = _try_load(final, full_key)
    if cached is not None:
        return cached

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        counts = _write_splits(documents, tokenizer, tmp, val_fraction, max(1, num_workers), show_progress)
        meta = _make_meta(counts, tokenizer, key, full_key, val_fraction)
        _write_json(tmp / "meta.json", meta)  # last: its presence marks a complete dataset
        _publish(tmp, final, full_key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful publish
    result = _try_load(final, full_key)
    if result is None:  # cannot happen unless something else rewrote the directory meanwhile
        raise DataError(f"{final}: the token dataset just built does not load; delete it and run again")
    return result


def _make_meta(counts: dict, tokenizer: Tokenizer, key: str, full_key: str, val_fraction: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        **counts,
        "val_fraction": val_fraction,
        "key": full_key,
        "source_key": key,
        "tokenizer": tokenizer.fingerprint,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path, full_key: str) -> None:
    """Rename the finished temp dir to ``final``, replacing an invalid leftover there."""
    if final.exists():
        if _try_load(final, full_key) is not None:
            return  # another process (e.g. another DDP rank) finished the same dataset first
        # A leftover that does not load (e.g. truncated by a full disk): move it
        # out of the way atomically, then delete it.
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".trash", dir=final.parent))
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # Lost a race with another process publishing the same dataset: keep theirs if complete.
        if _try_load(final, full_key) is None:
            raise


def _is_val(origin: str, index: int, val_fraction: float) -> bool:
    """Stable, uniform split decision from the document's origin (or index if it has none)."""
    name = origin or f"#{index}"
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


@dataclass
class _ChunkResult:
    """One chunk of documents, tokenized and split. Per split: the flat token
    array (EOS after each doc), each doc's token count and UTF-8 byte count."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    n_bytes: dict[str, list[int]]


def _process_chunk(
    tokenizer: Tokenizer, docs: list[tuple[str, str, int]], val_fraction: float, num_threads: int
) -> _ChunkResult:
    """Tokenize and split ``(text, origin, index)`` docs."""
    dtype = token_dtype(tokenizer.vocab_size)
    batch = tokenizer.encode_batch([text for text, _, _ in docs], num_threads=num_threads)
    lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch)) + 1  # + EOS
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    eos_at = np.cumsum(lengths) - 1
    is_token = np.ones(len(flat), dtype=bool)
    is_token[eos_at] = False
    flat[is_token] = np.fromiter(itertools.chain.from_iterable(batch), dtype=dtype, count=len(flat) - len(batch))
    flat[eos_at] = tokenizer.eos_id

    is_val = np.array([_is_val(origin, i, val_fraction) for _, origin, i in docs], dtype=bool)
    token_is_val = np.repeat(is_val, lengths)
    n_bytes = [len(text.encode("utf-8")) for text, _, _ in docs]
    return _ChunkResult(
        tokens={"train": flat[~token_is_val], "val": flat[token_is_val]},
        lengths={"train": lengths[~is_val], "val": lengths[is_val]},
        n_bytes={
            "train": [b for b, v in zip(n_bytes, is_val) if not v],
            "val": [b for b, v in zip(n_bytes, is_val) if v],
        },
    )


def _indexed_chunks(documents: Iterable[Document]) -> Iterator[list[tuple[str, str, int]]]:
    """Chunks of (text, origin, index); empty documents are dropped (they would be a lone EOS)."""
    numbered = ((d.text, d.origin) for d in documents if d.text)
    it = ((text, origin, i) for i, (text, origin) in enumerate(numbered))
    while chunk := list(itertools.islice(it, _CHUNK_DOCS)):
        yield chunk


def _append(f, tokens: np.ndarray) -> None:
    f.write(tokens.tobytes())


class _SplitWriter:
    """Appends documents to one split's .bin file and keeps its counts."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.file = open(path, "wb")
        self.n_tokens = self.n_bytes = self.n_docs = 0
        self.last_doc = (0, 0)  # (tokens, bytes) of the most recent document, to move it

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, doc_bytes: list[int]) -> None:
        if len(doc_lengths) == 0:
            return
        _append(self.file, tokens)
        self.n_tokens += len(tokens)
        self.n_bytes += sum(doc_bytes)
        self.n_docs += len(doc_lengths)
        self.last_doc = (int(doc_lengths[-1]), doc_bytes[-1])

    def pop_last_doc(self) -> tuple[np.ndarray, int]:
        """Remove the last document (truncate the file); return its tokens and byte count."""
        n_tok, n_bytes = self.last_doc
        keep = self.n_tokens - n_tok
        self.file.flush()
        tail = np.fromfile(self.path, dtype=self.dtype, offset=keep * self.dtype.itemsize)
        self.file.truncate(keep * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.n_tokens, self.n_bytes, self.n_docs = keep, self.n_bytes - n_bytes, self.n_docs - 1
        return tail, n_bytes

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _write_splits(documents, tokenizer, out_dir: Path, val_fraction, num_workers, show_progress) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out_dir / f"{s}.bin", dtype) for s in _SPLITS}
    progress = _Progress(show_progress)
    ok = False
    try:
        for chunk in _indexed_chunks(documents):
            result = _process_chunk(tokenizer, chunk, val_fraction, num_workers)
            for s in _SPLITS:
                writers[s].add(result.tokens[s], result.lengths[s], result.n_bytes[s])
            progress.update(
                sum(len(result.lengths[s]) for s in _SPLITS),
                sum(sum(result.n_bytes[s]) for s in _SPLITS),
                sum(len(result.tokens[s]) for s in _SPLITS),
            )
        _ensure_both_splits(writers, val_fraction)
        ok = True
    finally:
        for w in writers.values():
            w.close()
        progress.close(ok)
    if writers["train"].n_docs + writers["val"].n_docs == 0:
        raise DataError("empty corpus: no document has any text to tokenize; check the data source config")
    return {f"{field}_{s}": getattr(writers[s], field) for field in ("n_tokens", "n_bytes", "n_docs") for s in _SPLITS}


def _ensure_both_splits(writers: dict[str, _SplitWriter], val_fraction: float) -> None:
    """With >= 2 docs, move the last document across if a split came out empty.

    Tiny corpora can hash every document to one side; an empty val split would
    silently disable validation, an empty train split would make training fail.
    """
    train, val = writers["train"], writers["val"]
    if val_fraction <= 0 or train.n_docs + val.n_docs < 2:
        return
    if val.n_docs == 0:
        src, dst = train, val
    elif train.n_docs == 0:
        src, dst = val, train
    else:
        return
    tokens, n_bytes = src.pop_last_doc()
    dst.add(tokens, np.array([len(tokens)]), [n_bytes])


class _Progress:
    """A rich progress bar on a terminal; otherwise a plain line every 10 s and at the end."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = self.last_print = time.monotonic()
        self.docs = self.bytes = self.tokens = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("tokenizing")

    def _line(self) -> str:
        secs = max(time.monotonic() - self.start, 1e-9)
        return (
            f"tokenizing: {self.docs:,} docs, {self.bytes / 1e6:.1f} MB -> {self.tokens:,} tokens "
            f"({self.bytes / 1e6 / secs:.1f} MB/s)"
        )

    def update(self, docs: int, n_bytes: int, tokens: int) -> None:
        self.docs, self.bytes, self.tokens = self.docs + docs, self.bytes + n_bytes, self.tokens + tokens
        if self.bar is not None:
            self.bar.update(self.task, description=self._line())
        elif self.enabled and time.monotonic() - self.last_print > 10:
            self.last_print = time.monotonic()
            print(self._line(), file=sys.stderr, flush=True)

    def close(self, ok: bool) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.enabled and ok:
            print(self._line() + " done", file=sys.stderr, flush=True)
