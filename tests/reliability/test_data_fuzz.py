"""Fuzzing the data readers with malformed inputs: random bytes, wrong types, huge lines, empty
files, BOMs, mixed encodings, NUL bytes, truncated and mangled records.

Every case either loads (valid Unicode text, each document saying where it came from) or fails
with a DataError naming the file (and the line, where there is one); nothing raises another
exception and nothing hangs. Cases come from a fixed seed, so a failure reproduces by its id.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge.data.sources import iter_jsonl_records, read_jsonl, read_text_files
from lmforge.errors import DataError

SEED = 20240801
PER_CASE_S = 10.0  # generous for a loaded machine; a hang would blow far past it
BOM = b"\xef\xbb\xbf"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "héllo", "naïve", "日本語", "🙂", "<b>bold</b>", "x\ty", "\\n"]


@dataclass
class Case:
    id: str
    kind: str  # jsonl (read_jsonl) | records (iter_jsonl_records) | text (read_text_files)
    seed: int
    make: Callable[[random.Random, list], bytes | list[bytes]]  # appends the bad line it made, if any
    exact_line: bool  # the bad line is certainly malformed: the error must name exactly it


def text(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def good_lines(rng: random.Random, n: int) -> list[bytes]:
    return [json.dumps({"text": text(rng), "id": i}, ensure_ascii=rng.random() < 0.5).encode() for i in range(n)]


def jsonl(lines: list[bytes], crlf: bool = False) -> bytes:
    return b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)


def random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


# ---------------------------------------------------------------------------- JSONL mutations
def insert(data: bytes, k: int, extra: bytes) -> bytes:
    return data[:k] + extra + data[k:]


WRONG_TYPES = [1, 2.5, None, True, ["a", "b"], {"nested": "x"}, float("inf")]


def with_bad_line(mutate: Callable[[random.Random, bytes], bytes]):
    """n good lines, one of them (its number in the case) replaced by mutate(rng, line)."""

    def make(rng: random.Random, where: list) -> bytes:
        lines = good_lines(rng, rng.randint(1, 12))
        i = rng.randrange(len(lines))
        lines[i] = mutate(rng, lines[i])
        where.append(i + 1)
        return jsonl(lines, crlf=rng.random() < 0.2)

    return make


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "truncated": lambda rng, line: line[: rng.randrange(1, len(line) - 1)],
    "nul_byte": lambda rng, line: insert(line, rng.randrange(len(line)), b"\x00"),
    "latin1": lambda rng, line: json.dumps({"text": "caf\u00e9 " + text(rng)}, ensure_ascii=False).encode(
        "latin-1", errors="replace"
    ),
    "utf16": lambda rng, line: json.dumps({"text": text(rng)}).encode("utf-16"),
    "random_bytes_line": lambda rng, line: b"#" + random_bytes(rng, rng.randint(1, 300)).replace(b"\n", b""),
    "wrong_type": lambda rng, line: json.dumps({"text": rng.choice(WRONG_TYPES)}).encode(),
    "missing_field": lambda rng, line: json.dumps({"body": text(rng)}).encode(),
    "not_an_object": lambda rng, line: json.dumps(rng.choice([[1, 2], "text", 3, None, True])).encode(),
    "trailing_garbage": lambda rng, line: line + b" }" + random_bytes(rng, 3).replace(b"\n", b""),
    "bom_mid_file": lambda rng, line: BOM + line,
    "huge_garbage_line": lambda rng, line: b"{" + b"x" * rng.randint(1_000_000, 3_000_000),
    "unbalanced": lambda rng, line: b'{"text": "' + text(rng).encode(),
}


# Still a JSON object: iter_jsonl_records yields it; only read_jsonl (which reads the field) refuses it.
VALID_RECORDS = ("wrong_type", "missing_field", "bom_mid_file")


def case_random_file(rng, where):
    return random_bytes(rng, rng.choice([0, 1, 2, 10, 100, 1000, 5000]))


def case_mangled_file(rng, where):
    """Good JSONL with random bytes flipped, dropped or inserted anywhere (may stay valid)."""
    data = bytearray(jsonl(good_lines(rng, rng.randint(1, 10))))
    for _ in range(rng.randint(1, 6)):
        op, k = rng.random(), rng.randrange(len(data))
        if op < 0.4:
            data[k] = rng.getrandbits(8)
        elif op < 0.7:
            del data[k]
        else:
            data.insert(k, rng.choice([0, 0x22, 0x5C, 0x7B, 0x7D, 0x0A, 0xC3, 0xFF, 0xEF, rng.getrandbits(8)]))
    return bytes(data)


def case_valid_odd(rng, where):
    """Valid but unusual: BOM first, CRLF, blank and whitespace lines, huge valid text, unicode
    line separators, NaN/inf elsewhere in the record, duplicate keys, moderate nesting."""
    lines = good_lines(rng, rng.randint(1, 6))
    extras = [
        b"",
        b"   ",
        b"\t",
        json.dumps({"text": "a\u2028b\u2029c\u0085d"}, ensure_ascii=False).encode(),
        b'{"text": "dup", "text": "second wins"}',
        b'{"text": "n", "score": NaN, "big": 1e400}',
        json.dumps({"text": "deep", "x": json.loads("[" * 50 + "]" * 50)}).encode(),
        json.dumps({"text": "big " + "y" * rng.randint(100_000, 2_000_000)}).encode(),
    ]
    for _ in range(rng.randint(1, 3)):
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(extras))
    data = jsonl(lines, crlf=rng.random() < 0.5)
    return (BOM + data) if rng.random() < 0.5 else data


def case_empty(rng, where):
    return rng.choice([b"", b"\n", b"\n\n  \n", BOM, BOM + b"\n", jsonl([b'{"text": "   "}', b'{"text": ""}'])])


# ---------------------------------------------------------------------------- text files
def case_text_files(rng, where):
    """Several text files, each one of: good text, random bytes, BOM, NUL, latin-1, UTF-16, empty, huge."""
    kinds = [
        lambda: text(rng, 30).encode(),
        lambda: random_bytes(rng, rng.randint(1, 2000)),
        lambda: BOM + text(rng).encode(),
        lambda: text(rng).encode() + b"\x00" + text(rng).encode(),
        lambda: ("caf\u00e9 " + text(rng)).encode("latin-1", errors="replace"),
        lambda: text(rng).encode("utf-16"),
        lambda: b"",
        lambda: b"  \n\t ",
        lambda: ("z" * rng.randint(1_000_000, 2_000_000)).encode(),
        lambda: text(rng).encode().replace(b" ", b"\r\n"),
    ]
    return [rng.choice(kinds)() for _ in range(rng.randint(1, 4))]


def build_cases() -> list[Case]:
    rng = random.Random(SEED)
    plan: list[tuple[str, str, Callable, bool]] = []
    for name, mutate in MUTATIONS.items():
        n = 1 if name.startswith("huge") else 4
        for kind in ("jsonl", "records"):
            exact = name != "bom_mid_file" and not (kind == "records" and name in VALID_RECORDS)
            plan += [(f"{kind}-{name}", kind, with_bad_line(mutate), exact)] * n
    plan += [("jsonl-random-file", "jsonl", case_random_file, False)] * 20
    plan += [("records-random-file", "records", case_random_file, False)] * 6
    plan += [("jsonl-mangled", "jsonl", case_mangled_file, False)] * 30
    plan += [("jsonl-valid-odd", "jsonl", case_valid_odd, False)] * 12
    plan += [("jsonl-empty", "jsonl", case_empty, False)] * 6
    plan += [("text-files", "text", case_text_files, False)] * 40
    return [
        Case(f"{i:03d}-{name}", kind, rng.getrandbits(32), make, exact)
        for i, (name, kind, make, exact) in enumerate(plan)
    ]


CASES = build_cases()


def consume(kind: str, paths: list[Path]) -> list:
    if kind == "jsonl":
        return [(d.text, d.origin) for d in read_jsonl(paths[0])]
    if kind == "records":
        return list(iter_jsonl_records(paths[0]))
    return [(d.text, d.origin) for d in read_text_files([str(p) for p in paths])]


def test_the_fuzz_corpus_is_big_and_varied():
    assert len(CASES) >= 200
    assert len({c.id.split("-", 1)[1] for c in CASES}) >= 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_loads_or_fails_with_file_and_line(tmp_path, case):
    rng = random.Random(case.seed)
    where: list[int] = []
    data = case.make(rng, where)
    blobs = data if isinstance(data, list) else [data]
    suffix = ".txt" if case.kind == "text" else ".jsonl"
    paths = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"input{i}{suffix}"
        p.write_bytes(blob)
        paths.append(p)

    start = time.perf_counter()
    try:
        out = consume(case.kind, paths)
    except DataError as e:
        msg = str(e)
        assert any(str(p) in msg for p in paths), f"the error does not name the file: {msg}"
        if "empty corpus" not in msg:
            assert re.search(r"\.(jsonl|txt):\d+|line \d+", msg), f"the error does not name the line: {msg}"
        if case.exact_line and where:
            assert f"{paths[0]}:{where[0]}:" in msg, f"expected line {where[0]}: {msg}"
    else:
        assert not (case.exact_line and where), f"line {where[0]} is malformed but loaded: {out[:3]}"
        for item in out:
            if case.kind == "records":
                lineno, obj = item
                assert isinstance(lineno, int) and isinstance(obj, dict)
            else:
                txt, origin = item
                assert isinstance(txt, str) and txt.strip()
                txt.encode("utf-8")  # real Unicode: no lone surrogates a tokenizer would choke on
                assert any(origin.startswith(str(p)) for p in paths)
    assert time.perf_counter() - start < PER_CASE_S


# ---------------------------------------------------------------------------- found by fuzzing
# Inputs that once escaped as something other than DataError (RecursionError, ValueError) or
# loaded as text that cannot be encoded; each is now an error naming file and line.
KNOWN = {
    "deep_nesting": b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",  # RecursionError
    "huge_integer": b'{"text": "a", "n": 1' + b"0" * 5000 + b"}\n",  # ValueError (int max str digits)
    "lone_surrogate": b'{"text": "a\\ud800b"}\n',  # loads, but the text cannot be encoded as UTF-8
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_crashes_become_data_errors(tmp_path, name):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + KNOWN[name])
    with pytest.raises(DataError) as e:
        [d.text.encode("utf-8") for d in read_jsonl(path)]
    assert f"{path}:2" in str(e.value)
