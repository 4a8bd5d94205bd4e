"""Document sources: text files, JSONL, synthetic; every bad input's error message."""

from __future__ import annotations

import json
import os
import time

import pytest

from lmforge.data.sources import (
    Document,
    clean_text,
    corpus_fingerprint,
    iter_jsonl_records,
    read_jsonl,
    read_text_files,
    synthetic_documents,
)
from lmforge.errors import DataError


def write(path, content: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def write_jsonl(path, lines: list[str]):
    return write(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------ clean_text


def test_clean_text_strips_html_and_collapses_spaces_but_keeps_newlines():
    html = "  <p>Hello   <b>world</b>!</p>\n<div class='x'>\tnext\t\tline</div>  "
    assert clean_text(html) == "Hello world!\n next line"
    assert clean_text(html, strip_html=False) == "<p>Hello <b>world</b>!</p>\n<div class='x'> next line</div>"
    assert clean_text("a  b\n\n\nc", strip_html=False) == "a b\n\n\nc"


# ------------------------------------------------------------------ text files


def test_each_file_is_one_document_in_sorted_glob_order(tmp_path):
    write(tmp_path / "b.txt", "second\n")
    write(tmp_path / "a.txt", "first\n")
    write(tmp_path / "sub" / "c.txt", "    indented code\n\tkept\n")
    docs = list(read_text_files(str(tmp_path / "**" / "*.txt")))
    assert [os.path.relpath(d.origin, tmp_path) for d in docs] == ["a.txt", "b.txt", os.path.join("sub", "c.txt")]
    assert [d.text for d in docs] == ["first\n", "second\n", "    indented code\n\tkept\n"]


def test_plain_paths_and_globs_mix_without_duplicates(tmp_path):
    a = write(tmp_path / "a.txt", "A")
    write(tmp_path / "b.txt", "B")
    docs = list(read_text_files([str(a), str(tmp_path / "*.txt")]))
    assert [d.text for d in docs] == ["A", "B"]


def test_cleaning_is_opt_in(tmp_path):
    f = write(tmp_path / "a.html", "<p>x   y</p>")
    assert [d.text for d in read_text_files(str(f))] == ["<p>x   y</p>"]
    assert [d.text for d in read_text_files(str(f), clean_html=True, collapse_whitespace=True)] == ["x y"]


def test_bom_is_stripped(tmp_path):
    f = write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")
    assert [d.text for d in read_text_files(str(f))] == ["hello"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"file not found: '.*nope\.txt' \(data\.paths\)"):
        read_text_files(str(tmp_path / "nope.txt"))


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "x" / "*.txt")
    with pytest.raises(DataError, match=r"no file matches '.*\*\.txt' \(data\.paths\)"):
        read_text_files(pattern)


def test_directory_instead_of_files(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_text_files(str(tmp_path))


def test_empty_corpus(tmp_path):
    write(tmp_path / "a.txt", "")
    write(tmp_path / "b.txt", "  \n\n")
    with pytest.raises(DataError, match=r"empty corpus: all 2 file\(s\)"):
        list(read_text_files(str(tmp_path / "*.txt")))


def test_invalid_utf8_names_file_and_byte(tmp_path):
    f = write(tmp_path / "latin1.txt", "caf\u00e9\nna\u00efve".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 at byte 3 \(line 1\); re-encode it as UTF-8"):
        list(read_text_files(str(f)))


def test_invalid_utf8_offset_counts_the_bom(tmp_path):
    f = write(tmp_path / "x.txt", b"\xef\xbb\xbfok\n\xff")
    with pytest.raises(DataError, match=r"at byte 6 \(line 2\)"):
        list(read_text_files(str(f)))


def test_nul_byte_names_file_and_offset(tmp_path):
    f = write(tmp_path / "blob.bin", b"text\n\x00\x01\x02")
    with pytest.raises(DataError, match=r"blob\.bin: NUL byte at byte 5 \(line 2\)"):
        list(read_text_files(str(f)))


# ----------------------------------------------------------------------- JSONL


def test_read_jsonl_documents_with_line_origins(tmp_path):
    f = write_jsonl(
        tmp_path / "x.jsonl", [json.dumps({"text": "one"}), "", "   ", json.dumps({"text": "two", "id": 2})]
    )
    docs = list(read_jsonl(f))
    assert docs == [Document("one", f"{f}:1"), Document("two", f"{f}:4")]


def test_read_jsonl_other_field_and_cleaning(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [json.dumps({"body": "<b>bold</b>   move"})])
    assert [d.text for d in read_jsonl(f, text_field="body", clean_html=True, collapse_whitespace=True)] == [
        "bold move"
    ]


def test_read_jsonl_strips_bom(tmp_path):
    f = write(tmp_path / "x.jsonl", b'\xef\xbb\xbf{"text": "hi"}\n')
    assert [d.text for d in read_jsonl(f)] == ["hi"]


def test_malformed_json_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"text": "ok"}', '{"text": "a" "b"}'])
    with pytest.raises(
        DataError, match=r"x\.jsonl:2: malformed JSON \(Expecting ',' delimiter.*fix the line or remove it"
    ):
        list(read_jsonl(f))


def test_non_object_line(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"text": "ok"}', '["a", "list"]'])
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected a JSON object.*got an array"):
        list(read_jsonl(f))


def test_missing_field_lists_fields_present(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"text": "ok"}', "", '{"content": "x", "id": 3}'])
    with pytest.raises(
        DataError, match=r"x\.jsonl:3: no field 'text' \(data\.text_field\); fields present: content, id"
    ):
        list(read_jsonl(f))


def test_non_string_field(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"text": 42}'])
    with pytest.raises(
        DataError, match=r"x\.jsonl:1: field 'text' \(data\.text_field\) is a number, expected a string"
    ):
        list(read_jsonl(f))


def test_jsonl_invalid_utf8_and_nul(tmp_path):
    f = write(tmp_path / "x.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid UTF-8"):
        list(read_jsonl(f))
    g = write(tmp_path / "y.jsonl", b'{"text": "a\x00"}\n')
    with pytest.raises(DataError, match=r"y\.jsonl:1: NUL byte"):
        list(read_jsonl(g))


def test_jsonl_missing_file_fails_at_call(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl' \(data\.path\): file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="file not found"):
        iter_jsonl_records(tmp_path / "missing.jsonl")


def test_jsonl_empty_corpus(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"text": ""}', '{"text": "   "}'])
    with pytest.raises(DataError, match=r"empty corpus: .*x\.jsonl \(data\.path\) has 2 record"):
        list(read_jsonl(f))


def test_iter_jsonl_records_yields_line_numbers(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"a": 1}', "", '{"b": [1, 2]}'])
    assert list(iter_jsonl_records(f)) == [(1, {"a": 1}), (3, {"b": [1, 2]})]


def test_huge_line_is_read_quickly(tmp_path):
    big = "word " * 2_000_000  # a 10 MB line
    f = write_jsonl(tmp_path / "x.jsonl", [json.dumps({"text": big}), '{"text": "small"}'])
    start = time.monotonic()
    docs = list(read_jsonl(f))
    assert [len(d.text) for d in docs] == [len(big), 5]
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------- synthetic


def test_synthetic_documents():
    pytest.importorskip("lmforge.world.generator")
    docs = list(synthetic_documents(seed=0, n_docs=20, wrong_rate=0.3))
    assert len(docs) == 20
    assert [d.origin for d in docs] == [f"synthetic:{i}" for i in range(20)]
    assert all(isinstance(d.text, str) and d.text for d in docs)
    assert docs == list(synthetic_documents(seed=0, n_docs=20, wrong_rate=0.3))  # deterministic
    assert docs != list(synthetic_documents(seed=1, n_docs=20, wrong_rate=0.3))


# ----------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_content_not_touches(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    write(tmp_path / "b.txt", "beta")
    pattern = str(tmp_path / "*.txt")
    fp = corpus_fingerprint(pattern)
    assert corpus_fingerprint([pattern]) == fp
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes
    assert corpus_fingerprint(pattern) == fp
    write(a, "alphA")  # same size, other content
    changed = corpus_fingerprint(pattern)
    assert changed != fp
    write(tmp_path / "c.txt", "gamma")  # a new file matched by the glob
    assert corpus_fingerprint(pattern) not in (fp, changed)


def test_fingerprint_of_missing_input(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        corpus_fingerprint(str(tmp_path / "*.jsonl"))
