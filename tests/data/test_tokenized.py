"""Memory-mapped token datasets: contents, split, cache reuse/rebuild, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.data import tokenized
from lmforge.data.sources import Document, corpus_fingerprint, read_text_files
from lmforge.data.tokenized import build_token_dataset, load_token_dataset, token_dtype
from lmforge.data.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from lmforge.errors import DataError

TEXTS = [
    f"Document {i}: the cat sat on mat number {i * 37}.\n    indented line {i}\n\n大规模语言模型 {i}" for i in range(60)
]


def make_docs(n: int = 60) -> list[Document]:
    return [Document(TEXTS[i % len(TEXTS)] + "!" * (i // len(TEXTS)), f"doc-{i}") for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tok"))


def build(docs, tok, cache_dir, key="k", val_fraction=0.2, **kwargs):
    return build_token_dataset(docs, tok, cache_dir, key=key, val_fraction=val_fraction, show_progress=False, **kwargs)


def split_docs(tok: Tokenizer, stream: np.ndarray) -> list[str]:
    """Decode a stream back into its documents (each ends with EOS)."""
    assert len(stream) == 0 or stream[-1] == EOS_ID
    ends = np.flatnonzero(np.asarray(stream) == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[s:e]) for s, e in zip(starts, ends)]


def dataset_dirs(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


# ---------------------------------------------------------------------- build


def test_build_contents_and_meta(tok, tmp_path):
    docs = make_docs()
    ds = build(docs, tok, tmp_path)
    m = ds.meta
    assert ds.dir == tmp_path / f"tokens-{m['key'][:16]}"
    assert sorted(p.name for p in ds.dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert m["dtype"] == "uint16" and ds.train.dtype == np.uint16 and m["vocab_size"] == tok.vocab_size
    assert m["tokenizer"] == tok.fingerprint and m["source_key"] == "k"

    train_texts, val_texts = split_docs(tok, ds.train), split_docs(tok, ds.val)
    by_text = {d.text: d for d in docs}
    # Every document appears exactly once, whole, in order within its split.
    assert sorted(train_texts + val_texts) == sorted(by_text)
    assert train_texts == [d.text for d in docs if d.text in set(train_texts)]
    assert (m["n_docs_train"], m["n_docs_val"]) == (len(train_texts), len(val_texts))
    assert (m["n_tokens_train"], m["n_tokens_val"]) == (len(ds.train), len(ds.val))
    assert m["n_tokens_train"] + m["n_tokens_val"] == sum(len(tok.encode(d.text)) + 1 for d in docs)
    assert m["n_bytes_train"] == sum(len(t.encode("utf-8")) for t in train_texts)
    assert m["n_bytes_val"] == sum(len(t.encode("utf-8")) for t in val_texts)
    assert tok.bos_id not in set(ds.train.tolist())  # no BOS in pretraining streams


def test_arrays_are_read_only_memmaps(tok, tmp_path):
    ds = build(make_docs(), tok, tmp_path)
    assert isinstance(ds.train, np.memmap) and isinstance(ds.val, np.memmap)
    with pytest.raises(ValueError):
        ds.train[0] = 5
    reloaded = load_token_dataset(ds.dir)
    assert np.array_equal(reloaded.train, ds.train) and reloaded.meta == ds.meta


def test_token_dtype():
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_empty_documents_are_dropped(tok, tmp_path):
    docs = [Document("", "e1"), *make_docs(5), Document("", "e2")]
    ds = build(docs, tok, tmp_path)
    assert ds.meta["n_docs_train"] + ds.meta["n_docs_val"] == 5


@pytest.mark.parametrize("docs", [[], [Document("", "a"), Document("", "b")]], ids=["no_docs", "all_empty"])
def test_empty_corpus(tok, tmp_path, docs):
    with pytest.raises(DataError, match="empty corpus"):
        build(docs, tok, tmp_path)
    assert dataset_dirs(tmp_path) == []


def test_bad_val_fraction(tok, tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        build(make_docs(), tok, tmp_path, val_fraction=1.0)


def test_progress_goes_to_stderr_when_enabled(tok, tmp_path, capsys):
    build_token_dataset(make_docs(), tok, tmp_path, key="k", val_fraction=0.2, show_progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "tokenizing: 60 docs" in err and "done" in err


# ---------------------------------------------------------------------- split


def test_split_is_by_document_disjoint_and_deterministic(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenized, "_CHUNK_DOCS", 7)  # exercise several chunks
    docs = make_docs(200)
    a = build(docs, tok, tmp_path / "a", val_fraction=0.25)
    b = build(iter(docs), tok, tmp_path / "b", val_fraction=0.25, num_workers=1)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    train, val = set(split_docs(tok, a.train)), set(split_docs(tok, a.val))
    assert not train & val
    assert 25 <= len(val) <= 75  # ~25% of 200 documents


def test_split_depends_on_origin_not_position(tok, tmp_path):
    docs = make_docs(40)
    a = build(docs, tok, tmp_path / "a")
    b = build(docs[::-1], tok, tmp_path / "b")  # same documents, other order
    assert sorted(split_docs(tok, a.val)) == sorted(split_docs(tok, b.val))


@pytest.mark.parametrize("val_fraction", [0.001, 0.999])
def test_two_docs_always_give_both_splits(tok, tmp_path, val_fraction):
    for trial in range(5):
        docs = [Document(f"first doc {trial}", f"a{trial}"), Document(f"second doc {trial}", f"b{trial}")]
        ds = build(docs, tok, tmp_path, key=f"{val_fraction}-{trial}", val_fraction=val_fraction)
        assert (ds.meta["n_docs_train"], ds.meta["n_docs_val"]) == (1, 1)
        assert sorted(split_docs(tok, ds.train) + split_docs(tok, ds.val)) == sorted(d.text for d in docs)
        assert ds.meta["n_bytes_train"] + ds.meta["n_bytes_val"] == sum(len(d.text) for d in docs)


def test_no_val_split_when_val_fraction_is_zero(tok, tmp_path):
    ds = build(make_docs(10), tok, tmp_path, val_fraction=0.0)
    assert ds.meta["n_docs_val"] == 0 and len(ds.val) == 0 and not ds.val.flags.writeable
    assert load_token_dataset(ds.dir).meta["n_tokens_val"] == 0


# ---------------------------------------------------------------------- cache


def test_unchanged_inputs_reuse_without_tokenizing(tok, tmp_path, monkeypatch):
    first = build(make_docs(), tok, tmp_path)
    mtime = (first.dir / "meta.json").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache had the dataset")

    def exploding_docs():
        raise AssertionError("documents were read on a cache hit")
        yield  # pragma: no cover

    monkeypatch.setattr(tokenized, "_process_chunk", no_tokenizing)
    again = build(exploding_docs(), tok, tmp_path)
    assert again.dir == first.dir and again.meta == first.meta
    assert (again.dir / "meta.json").stat().st_mtime_ns == mtime
    assert dataset_dirs(tmp_path) == [first.dir.name]


def test_changed_file_rebuilds(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.txt").write_text(TEXTS[i], encoding="utf-8")
    pattern = str(data / "*.txt")
    cache = tmp_path / "cache"
    before = build(read_text_files(pattern), tok, cache, key=corpus_fingerprint(pattern))
    (data / "2.txt").write_text("a brand new text", encoding="utf-8")
    after = build(read_text_files(pattern), tok, cache, key=corpus_fingerprint(pattern))
    assert after.dir != before.dir
    texts = split_docs(tok, after.train) + split_docs(tok, after.val)
    assert "a brand new text" in texts and TEXTS[2] not in texts


def test_new_tokenizer_rebuilds(tok, tmp_path):
    other = train_tokenizer(TEXTS[:10], 350, tmp_path / "tok2")
    a = build(make_docs(), tok, tmp_path / "cache")
    b = build(make_docs(), other, tmp_path / "cache")
    assert a.dir != b.dir and b.meta["tokenizer"] == other.fingerprint


# ------------------------------------------------------------------ atomicity


def crash_on_second_write(monkeypatch):
    real_append, calls = tokenized._append, []

    def flaky_append(f, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_append(f, tokens)

    monkeypatch.setattr(tokenized, "_CHUNK_DOCS", 5)
    monkeypatch.setattr(tokenized, "_append", flaky_append)


def test_crash_mid_build_leaves_nothing_that_looks_valid(tok, tmp_path, monkeypatch):
    crash_on_second_write(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        build(make_docs(), tok, tmp_path)
    assert dataset_dirs(tmp_path) == []  # no final dir, no temp dir left behind
    monkeypatch.undo()
    ds = build(make_docs(), tok, tmp_path)  # a later build succeeds
    assert ds.meta["n_docs_train"] + ds.meta["n_docs_val"] == 60


def test_killed_build_temp_dir_is_never_loaded(tok, tmp_path, monkeypatch):
    # A SIGKILL skips all cleanup: simulate by keeping the temp dir.
    monkeypatch.setattr(tokenized.shutil, "rmtree", lambda *a, **k: None)
    crash_on_second_write(monkeypatch)
    with pytest.raises(OSError):
        build(make_docs(), tok, tmp_path)
    [leftover] = dataset_dirs(tmp_path)
    assert leftover.startswith(".") and leftover.endswith(".tmp")
    assert not (tmp_path / leftover / "meta.json").exists()
    with pytest.raises(DataError, match="no meta.json"):
        load_token_dataset(tmp_path / leftover)


def test_failed_rebuild_leaves_existing_dataset_untouched(tok, tmp_path, monkeypatch):
    good = build(make_docs(), tok, tmp_path, key="v1")
    snapshot = {p.name: p.read_bytes() for p in good.dir.iterdir()}
    crash_on_second_write(monkeypatch)
    with pytest.raises(OSError):
        build(make_docs(80), tok, tmp_path, key="v2")  # inputs changed, rebuild fails
    assert dataset_dirs(tmp_path) == [good.dir.name]
    assert {p.name: p.read_bytes() for p in good.dir.iterdir()} == snapshot
    assert load_token_dataset(good.dir).meta == good.meta


def test_corrupt_dataset_is_detected_and_rebuilt(tok, tmp_path):
    ds = build(make_docs(), tok, tmp_path)
    with open(ds.dir / "train.bin", "r+b") as f:
        f.truncate(10)  # e.g. a disk that filled up after the fact
    with pytest.raises(DataError, match=r"meta\.json: unreadable or inconsistent.*train\.bin has 10 bytes"):
        load_token_dataset(ds.dir)
    rebuilt = build(make_docs(), tok, tmp_path)
    assert rebuilt.dir == ds.dir and len(rebuilt.train) == rebuilt.meta["n_tokens_train"]
    assert dataset_dirs(tmp_path) == [ds.dir.name]


def test_load_rejects_bad_meta(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(DataError, match="delete .* and run again"):
        load_token_dataset(tmp_path)


def test_concurrent_builder_that_finished_first_wins(tok, tmp_path, monkeypatch):
    first = build(make_docs(), tok, tmp_path)
    inode = (first.dir / "meta.json").stat().st_ino
    real_try_load, calls = tokenized._try_load, []

    def miss_first_lookup(dir, full_key):
        # As if another DDP rank published while this one was tokenizing.
        calls.append(dir)
        return None if len(calls) == 1 else real_try_load(dir, full_key)

    monkeypatch.setattr(tokenized, "_try_load", miss_first_lookup)
    second = build(make_docs(), tok, tmp_path)
    assert second.dir == first.dir and (second.dir / "meta.json").stat().st_ino == inode
    assert dataset_dirs(tmp_path) == [first.dir.name]  # our temp copy was discarded
