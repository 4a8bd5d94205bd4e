"""Where pretraining documents come from: text files, JSONL records, the synthetic world.

Every reader yields ``Document``s lazily (a corpus can be larger than memory)
and raises ``DataError`` for bad inputs with the file, the line (JSONL) or
byte offset, and what to do about it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import DataError

_BOM = b"\xef\xbb\xbf"
_HTML_TAG = re.compile(r"<[^<]+?>")
_SPACES = re.compile(r"[ \t]+")
# Files at least this big are fingerprinted by size + mtime instead of content.
_HASH_CONTENT_BELOW = 64 * 1024 * 1024


@dataclass
class Document:
    """One pretraining document. ``origin`` says where it came from, for error
    messages and for the stable train/val split: "data/a.txt",
    "data/x.jsonl:17" (file:line) or "synthetic:123"."""

    text: str
    origin: str


def clean_text(text: str, strip_html: bool = True, collapse_whitespace: bool = True) -> str:
    """The seed's cleaning step for raw web text.

    Strips HTML tags, collapses runs of spaces/tabs to one space (newlines are
    kept: they separate paragraphs) and strips the ends. Lossy by design: do
    not use it on code, whose indentation it would flatten.
    """
    if strip_html:
        text = _HTML_TAG.sub("", text)
    if collapse_whitespace:
        text = _SPACES.sub(" ", text)
    return text.strip()


def _maybe_clean(text: str, clean_html: bool, collapse_whitespace: bool) -> str:
    if clean_html or collapse_whitespace:
        return clean_text(text, strip_html=clean_html, collapse_whitespace=collapse_whitespace)
    return text


# ================================================================== text files


def expand_paths(paths: str | list[str], config_key: str = "data.paths") -> list[str]:
    """Expand files and globs (``**`` recurses) into a sorted, duplicate-free file list.

    Each entry must match at least one file: a typo should stop the run, not
    silently train on less data.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for pattern in map(str, paths):
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(
                    f"no file matches {pattern!r} ({config_key}); relative paths are resolved "
                    f"from {os.getcwd()}: check the pattern or use an absolute path"
                )
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise DataError(
                f"{pattern!r} ({config_key}) is a directory; name files or use a glob like "
                f"'{os.path.join(pattern, '*.txt')}'"
            )
        elif not os.path.isfile(pattern):
            raise DataError(
                f"file not found: {pattern!r} ({config_key}); relative paths are resolved "
                f"from {os.getcwd()}: check the path or use an absolute path"
            )
        else:
            files.append(pattern)
    return list(dict.fromkeys(files))  # drop repeats (a file matched by two globs), keep order


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def decode_utf8(raw: bytes, where: str) -> str:
    """Decode file bytes as UTF-8: strip a BOM, reject NUL bytes and invalid UTF-8.

    ``where`` names the file in error messages. Offsets reported are offsets in
    the original bytes (BOM included), so ``xxd -s N`` shows the culprit.
    """
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    nul = raw.find(b"\x00", skip)
    if nul >= 0:
        raise DataError(
            f"{where}: NUL byte at byte {nul} (line {_line_of(raw, nul)}); this looks like a "
            "binary file: remove it from the inputs or strip the NUL bytes"
        )
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + skip
        raise DataError(
            f"{where}: not valid UTF-8 at byte {at} (line {_line_of(raw, at)}); re-encode it as "
            f"UTF-8 (e.g. iconv -f latin1 -t utf-8 {where} > fixed.txt)"
        ) from None


def read_text_files(
    paths: str | list[str],
    *,
    clean_html: bool = False,
    collapse_whitespace: bool = False,
    config_key: str = "data.paths",
) -> Iterator[Document]:
    """Each file (paths may be globs, expanded sorted) is one document.

    Blank files are skipped; if every file is blank, raises "empty corpus".
    Cleaning is off by default: it would destroy code indentation.
    """
    files = expand_paths(paths, config_key)  # eager: a bad path fails before any work
    return _iter_text_files(files, paths, clean_html, collapse_whitespace, config_key)


def _iter_text_files(files, paths, clean_html, collapse_whitespace, config_key) -> Iterator[Document]:
    n_yielded = 0
    for path in files:
        with open(path, "rb") as f:
            text = decode_utf8(f.read(), path)
        text = _maybe_clean(text, clean_html, collapse_whitespace)
        if text.strip():
            n_yielded += 1
            yield Document(text=text, origin=path)
    if n_yielded == 0:
        raise DataError(
            f"empty corpus: all {len(files)} file(s) matched by {paths!r} ({config_key}) are empty "
            "or blank (after cleaning); point it at files with text"
        )


# ======================================================================= JSONL


def iter_jsonl_records(
    path: str | os.PathLike,
    config_key: str = "data.path",
    on_error: Callable[[DataError], None] | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Line numbers are 1-based, as editors show them. Errors name ``file:line``:
    undecodable bytes, malformed JSON, a line that is not a JSON object. Reads
    line by line, so memory is bounded by the longest line. With ``on_error`` an unreadable
    line's DataError goes to it and reading goes on (a generator that raised cannot resume).
    """
    path = os.fspath(path)
    _check_is_file(path, config_key)  # eager: a bad path fails at the call, not mid-iteration
    return _iter_jsonl(path, on_error)


def _check_is_file(path: str, config_key: str) -> None:
    if not os.path.isfile(path):
        what = "is a directory, not a JSONL file" if os.path.isdir(path) else "file not found"
        raise DataError(f"{path!r} ({config_key}): {what}; relative paths are resolved from {os.getcwd()}")


def _iter_jsonl(path: str, on_error: Callable[[DataError], None] | None) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            try:
                obj = _parse_jsonl_line(raw, f"{path}:{lineno}")
            except DataError as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            yield lineno, obj


def _parse_jsonl_line(raw: bytes, where: str) -> dict:
    if b"\x00" in raw:
        raise DataError(f"{where}: NUL byte in the line; fix the line or remove it")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not valid UTF-8 at byte {exc.start} of the line; re-encode the file as UTF-8"
        ) from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: malformed JSON ({exc.msg} at column {exc.colno}): fix the line or remove it"
        ) from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; flatten the line or remove it") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise DataError(f"{where}: unreadable JSON value ({str(exc)[:120]}); fix the line or remove it") from None
    if not isinstance(obj, dict):
        raise DataError(
            f'{where}: expected a JSON object like {{"text": "..."}}, got {_json_type(obj)}; '
            "each line must be one object"
        )
    return obj


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def get_text_field(obj: dict, field: str, where: str, config_key: str) -> str:
    """``obj[field]`` as a string, or a DataError naming the line and the config key."""
    if field not in obj:
        present = ", ".join(map(str, obj)) or "(none)"
        raise DataError(
            f"{where}: no field {field!r} ({config_key}); fields present: {present}. "
            f"Set {config_key} to the right field name"
        )
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} ({config_key}) is {_json_type(value)}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\\ud800" escapes decode to lone surrogates
        raise DataError(
            f"{where}: field {field!r} ({config_key}) holds an unpaired UTF-16 surrogate escape at character "
            f"{exc.start}, which is not text; fix the line or remove it"
        ) from None
    return value


def read_jsonl(
    path: str | os.PathLike,
    text_field: str = "text",
    *,
    clean_html: bool = False,
    collapse_whitespace: bool = False,
    config_key: str = "data.path",
    field_key: str = "data.text_field",
) -> Iterator[Document]:
    """One document per JSONL record, from its ``text_field``; origin is "file:line".

    Records whose text is blank (after cleaning) are skipped; if all are,
    raises "empty corpus".
    """
    path = os.fspath(path)
    records = iter_jsonl_records(path, config_key)  # eager path check
    return _iter_jsonl_documents(path, records, text_field, clean_html, collapse_whitespace, config_key, field_key)


def _iter_jsonl_documents(path, records, text_field, clean_html, collapse_whitespace, config_key, field_key):
    n_records = n_yielded = 0
    for lineno, obj in records:
        n_records += 1
        where = f"{path}:{lineno}"
        text = _maybe_clean(get_text_field(obj, text_field, where, field_key), clean_html, collapse_whitespace)
        if text.strip():
            n_yielded += 1
            yield Document(text=text, origin=where)
    if n_yielded == 0:
        raise DataError(
            f"empty corpus: {path} ({config_key}) has {n_records} record(s) and none has a non-blank "
            f"{text_field!r} field (after cleaning); check the file and {field_key}"
        )


# =================================================================== synthetic


def synthetic_documents(seed: int, n_docs: int, wrong_rate: float) -> Iterator[Document]:
    """Documents of the procedurally generated world; origin "synthetic:<index>"."""
    from lmforge.world.generator import SyntheticWorld  # lazy: only this source needs it

    for i, text in enumerate(SyntheticWorld(seed).pretrain_documents(n_docs, wrong_rate)):
        yield Document(text=text, origin=f"synthetic:{i}")


# ================================================================ fingerprints


def corpus_fingerprint(paths: str | list[str], config_key: str = "data.paths") -> str:
    """A cheap sha256 fingerprint of file inputs, for cache keys.

    Covers each file's resolved path and size, plus its content hash when
    smaller than 64 MiB, else its mtime_ns. Small files are keyed by content
    rather than mtime so a ``git checkout`` or ``touch`` that leaves bytes
    unchanged does not force a retokenization; big files use mtime because
    hashing them on every run would cost as much as reading them.
    """
    digest = hashlib.sha256()
    for path in expand_paths(paths, config_key):
        stat = os.stat(path)
        if stat.st_size < _HASH_CONTENT_BELOW:
            stamp = "sha256=" + _file_sha256(path)
        else:
            stamp = f"mtime_ns={stat.st_mtime_ns}"
        digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stamp}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
