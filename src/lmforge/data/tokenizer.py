"""A byte-fallback BPE tokenizer (SentencePiece) that round-trips text exactly.

Special ids are fixed for every tokenizer lmforge trains, so model code can
rely on them without looking at the tokenizer:

    PAD_ID = 0   padding (never produced by ``encode``; ignored by ``decode``)
    BOS_ID = 1   beginning of sequence (only with ``encode(..., bos=True)``)
    EOS_ID = 2   end of sequence / document separator in pretraining streams
    UNK_ID = 3   unknown -- never produced: byte fallback spells any character
                 the vocabulary lacks as its UTF-8 bytes

``decode(encode(x)) == x`` holds exactly for any string: English with runs of
spaces, code with tabs/indentation/blank lines, CJK, emoji. The trainer is
configured for that (identity normalization, no whitespace collapsing, no
dummy prefix, "\\n" as its own piece) and ``encode`` handles the one character
SentencePiece cannot represent literally, U+2581 "▁" (its internal stand-in
for a space), by spelling it as bytes.

``train_tokenizer`` caches models by a key of all its inputs, so repeated runs
(and every DDP rank) reuse one trained model instead of retraining.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lmforge.errors import DataError

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3

# SentencePiece's internal whitespace marker. A literal one in the input would
# decode as a space, so encode() spells it as its three UTF-8 byte pieces.
_SP_SPACE = "\u2581"
# Bump when the training recipe below changes in a way that changes models, so
# stale cached models are not reused.
_RECIPE_VERSION = 1
_MODEL_TYPES = ("bpe", "unigram")
_SAMPLE_SEED = 1234


class Tokenizer:
    """Wraps a ``sentencepiece.SentencePieceProcessor`` with lmforge's id conventions."""

    def __init__(self, processor: spm.SentencePieceProcessor, *, source: str = "<memory>"):
        self._sp = processor
        self._source = source
        _check_special_ids(processor, source)
        self._proto = processor.serialized_model_proto()
        self._fingerprint = hashlib.sha256(self._proto).hexdigest()
        # Byte pieces spelling U+2581; present in every byte-fallback model.
        self._sp_space_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in _SP_SPACE.encode()]

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        """Number of pieces. Can be smaller than the ``vocab_size`` asked for in
        training (small corpora); a model's embedding must be at least this big."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the serialized model: identifies the tokenizer in caches."""
        return self._fingerprint

    # ------------------------------------------------------------ encoding
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if _SP_SPACE in text:
            ids = self._encode_with_sp_space(text)
        else:
            ids = self._sp.encode(text)
        return _add_specials(ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many texts with SentencePiece's multithreaded batch encoder.

        ``num_threads=-1`` lets SentencePiece use every core.
        """
        texts = list(texts)
        batch = self._sp.encode(texts, num_threads=num_threads)
        for i, text in enumerate(texts):
            if _SP_SPACE in text:  # rare: redo the few texts with a literal "▁"
                batch[i] = self._encode_with_sp_space(text)
        return [_add_specials(ids, bos, eos) for ids in batch] if bos or eos else batch

    def _encode_with_sp_space(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(_SP_SPACE)):
            if i:
                ids.extend(self._sp_space_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; pad/bos/eos ids are skipped. Accepts lists, numpy arrays, tensors.

        Ids this tokenizer does not have decode as the unknown marker " ⁇ "
        instead of raising: a model's vocab may be larger than the tokenizer's
        (see ``vocab_size``) and sampling from it must not crash a run.
        """
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        size = self.vocab_size
        kept = [i if 0 <= i < size else UNK_ID for i in map(int, ids) if i not in (PAD_ID, BOS_ID, EOS_ID)]
        return self._sp.decode(kept)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # -------------------------------------------------------- persistence
    def proto(self) -> bytes:
        """The serialized SentencePiece model (what ``save`` writes)."""
        return self._proto

    @classmethod
    def from_proto(cls, proto: bytes, *, source: str = "<memory>") -> Tokenizer:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except Exception as exc:  # sentencepiece raises bare RuntimeError/OSError
            raise DataError(
                f"{source}: not a valid SentencePiece model ({exc}); delete it and let lmforge train a new tokenizer"
            ) from exc
        return cls(processor, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            proto = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"tokenizer file not found: {path}; check the path or train one") from None
        return cls.from_proto(proto, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the model atomically (a killed run never leaves half a file)."""
        _atomic_write_bytes(Path(path), self._proto)

    # ------------------------------------------------------------- dunder
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._proto == other._proto

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self._fingerprint[:12]}, source={self._source!r})"

    # Pickle by proto: multiprocessing workers and checkpoints need it, and the
    # SWIG processor object itself is not reliably picklable.
    def __getstate__(self) -> dict:
        return {"proto": self._proto, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        other = Tokenizer.from_proto(state["proto"], source=state["source"])
        self.__dict__.update(other.__dict__)


def _add_specials(ids: list[int], bos: bool, eos: bool) -> list[int]:
    if bos:
        ids = [BOS_ID, *ids]
    if eos:
        ids = [*ids, EOS_ID]
    return ids


def _check_special_ids(processor: spm.SentencePieceProcessor, source: str) -> None:
    actual = {
        "pad_id": processor.pad_id(),
        "bos_id": processor.bos_id(),
        "eos_id": processor.eos_id(),
        "unk_id": processor.unk_id(),
    }
    expected = {"pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID}
    if actual != expected:
        raise DataError(
            f"{source}: tokenizer special ids are {actual}, lmforge needs {expected}; "
            "train the tokenizer with lmforge.data.tokenizer.train_tokenizer"
        )


# ====================================================================== training


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    cache_dir: str | Path,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    fingerprint: str | None = None,
) -> Tokenizer:
    """Train (or reuse from ``cache_dir``) a byte-fallback tokenizer on ``texts``.

    ``vocab_size`` is an upper bound: on a small corpus BPE runs out of merges
    and the result is smaller (``hard_vocab_limit=False``), so size the model's
    embedding from ``tokenizer.vocab_size``. It must be big enough for the 256
    byte pieces, 4 special ids, the newline piece and one piece per distinct
    character kept by ``character_coverage``; a too small value raises a
    ``DataError`` saying how big.

    Texts are split into lines for training (a newline is its own piece, so no
    piece could span one anyway); lines longer than ``max_sentence_length``
    bytes are chunked rather than silently dropped by SentencePiece. At most
    ``input_sentence_size`` lines (a random sample) are used.

    The cache key covers the texts' content, every option and the
    SentencePiece version; the model lives at
    ``<cache_dir>/tokenizer-<key16>.model``. Pass ``fingerprint`` (e.g. from
    ``sources.corpus_fingerprint``) to identify the texts without reading
    them: then a cache hit never touches ``texts``.
    """
    _validate_train_args(vocab_size, model_type, character_coverage, max_sentence_length, input_sentence_size)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    options = _trainer_options(vocab_size, model_type, character_coverage, max_sentence_length, input_sentence_size)

    if fingerprint is not None:
        cached = _load_cached(_model_path(cache_dir, "fingerprint:" + fingerprint, options))
        if cached is not None:
            return cached

    # Stream the texts once into a scratch file of training lines, hashing as
    # we go: texts may be a one-shot generator larger than memory.
    fd, scratch = tempfile.mkstemp(prefix=".tokenizer-", suffix=".lines.tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            content_hash, n_lines = _write_training_lines(texts, out, max_sentence_length)
        texts_key = "fingerprint:" + fingerprint if fingerprint is not None else "sha256:" + content_hash
        path = _model_path(cache_dir, texts_key, options)
        cached = _load_cached(path)
        if cached is not None:
            return cached
        if n_lines == 0:
            raise DataError("cannot train a tokenizer on an empty corpus: every text is empty or blank")
        proto = _run_trainer(Path(scratch), n_lines, options)
    finally:
        os.unlink(scratch)
    _atomic_write_bytes(path, proto)
    return Tokenizer.from_proto(proto, source=str(path))


def _validate_train_args(vocab_size, model_type, character_coverage, max_sentence_length, input_sentence_size) -> None:
    problems = [
        (not isinstance(vocab_size, int) or vocab_size <= 0, f"vocab_size must be a positive int, got {vocab_size!r}"),
        (model_type not in _MODEL_TYPES, f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}"),
        (not 0.0 < character_coverage <= 1.0, f"character_coverage must be in (0, 1], got {character_coverage}"),
        (max_sentence_length < 16, f"max_sentence_length must be >= 16 bytes, got {max_sentence_length}"),
        (input_sentence_size < 0, f"input_sentence_size must be >= 0 (0 = all lines), got {input_sentence_size}"),
    ]
    for bad, message in problems:
        if bad:
            raise DataError(f"tokenizer {message} (data.tokenizer config)")


def _trainer_options(vocab_size, model_type, character_coverage, max_sentence_length, input_sentence_size) -> dict:
    """Every SentencePiece option that shapes the model (and hence the cache key)."""
    return {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "max_sentence_length": max_sentence_length,
        "input_sentence_size": input_sentence_size,  # sampled by lmforge, see _sample_mask
        "hard_vocab_limit": False,  # small corpora: vocab may come out smaller
        "byte_fallback": True,  # unseen characters become bytes, never <unk>
        "split_digits": True,  # "12345" -> 1 2 3 4 5: arithmetic-friendly
        "allow_whitespace_only_pieces": True,  # "▁▁▁▁" for code indentation
        "remove_extra_whitespaces": False,  # exact round trips
        "normalization_rule_name": "identity",  # no NFKC: exact round trips
        "add_dummy_prefix": False,  # no phantom leading space
        "user_defined_symbols": ["\n"],  # newline as an atomic piece
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "unk_id": UNK_ID,
        "sentencepiece_version": spm.__version__,
        "lmforge_recipe": _RECIPE_VERSION,
    }


def _model_path(cache_dir: Path, texts_key: str, options: dict) -> Path:
    blob = json.dumps({"texts": texts_key, "options": options}, sort_keys=True).encode()
    return cache_dir / f"tokenizer-{hashlib.sha256(blob).hexdigest()[:16]}.model"


def _load_cached(path: Path) -> Tokenizer | None:
    if not path.exists():
        return None
    try:
        return Tokenizer.load(path)
    except DataError:
        return None  # unreadable leftover (written by hand?): retrain and replace it


def _training_lines(text: str, max_bytes: int) -> Iterator[str]:
    for line in text.split("\n"):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            yield line
        else:
            step = max_bytes // 4  # a character is at most 4 UTF-8 bytes
            for start in range(0, len(line), step):
                yield line[start : start + step]


def _write_training_lines(texts: Iterable[str], out: io.BufferedWriter, max_bytes: int) -> tuple[str, int]:
    """Write training lines to ``out``; return (sha256 of the texts, line count)."""
    digest = hashlib.sha256()
    n_lines = 0
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"train_tokenizer expects str texts, got {type(text).__name__}")
        raw = text.encode("utf-8", "surrogatepass")
        # Length-prefix each text so ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
        for line in _training_lines(text, max_bytes):
            out.write(line.encode("utf-8", "replace") + b"\n")
            n_lines += 1
    return digest.hexdigest(), n_lines


def _sample_mask(n_lines: int, sample_size: int) -> np.ndarray | None:
    """Which training lines to use, or None for all.

    Sampled here with a fixed seed rather than by SentencePiece, whose own
    sampling is not reproducible even with set_random_generator_seed: two DDP
    nodes without a shared cache must train the very same tokenizer.
    """
    if sample_size == 0 or n_lines <= sample_size:
        return None
    mask = np.zeros(n_lines, dtype=bool)
    mask[np.random.default_rng(_SAMPLE_SEED).choice(n_lines, sample_size, replace=False)] = True
    return mask


def _read_training_lines(path: Path, mask: np.ndarray | None) -> Iterator[str]:
    # Binary mode splits on b"\n" only; text mode would also split on "\r".
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if mask is None or mask[i]:
                yield raw.rstrip(b"\n").decode("utf-8", "replace")


_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _run_trainer(lines_path: Path, n_lines: int, options: dict) -> bytes:
    sp_options = {k: v for k, v in options.items() if k not in ("sentencepiece_version", "lmforge_recipe")}
    sp_options["input_sentence_size"] = 0  # already sampled: SentencePiece must take all
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_read_training_lines(lines_path, _sample_mask(n_lines, options["input_sentence_size"])),
            model_writer=model,
            minloglevel=2,  # silence SentencePiece's per-step INFO/WARNING chatter
            num_threads=min(16, os.cpu_count() or 1),
            **sp_options,
        )
    except RuntimeError as exc:
        match = _TOO_SMALL.search(str(exc))
        if match is None:
            raise
        asked, needed = match.groups()
        raise DataError(
            f"tokenizer vocab_size={asked} is too small for this corpus: it needs at least "
            f"{needed} pieces (256 byte pieces + 4 special ids + the newline piece + one per "
            f"distinct character). Set model.vocab_size (data.tokenizer.vocab_size) to at least "
            f"{needed}, or lower character_coverage (e.g. 0.9995) so rare characters fall back to bytes"
        ) from exc
    return model.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
