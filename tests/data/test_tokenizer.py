"""Tokenizer: exact round trips, fixed special ids, byte fallback, caching."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from lmforge.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from lmforge.errors import DataError

ENGLISH = "The quick brown fox  jumps over the lazy dog.  \nIt was the best of times, it was the worst of times.   "
CODE = (
    "def fibonacci(n):\n"
    "    if n < 2:\n"
    "        return n\n"
    "\n"
    "\n"
    "\tfor i in range(10):\n"
    "\t\tprint(i)  # tabbed\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n"
)
CHINESE = "大规模语言模型是一种深度学习的算法，它能够处理大量的文本数据。"
NUMBERS = "12345 67890 12345 12345 2024 1999 12345\n"
# The training corpus: the English, code, Chinese and number samples, repeated
# so BPE has merges to learn (in particular "12345" would merge without split_digits).
CORPUS = [ENGLISH, CODE, CHINESE, NUMBERS] * 30
VOCAB = 400  # byte fallback alone needs 256 + 4 specials + newline + the corpus's characters


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(CORPUS, VOCAB, tmp_path_factory.mktemp("tok"))


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_piece(i) for i in tok.encode(text)]


# ----------------------------------------------------------------- round trips

ROUND_TRIP_CASES = {
    "english_double_and_trailing_spaces": ENGLISH,
    "python_code_indent_tabs_blank_lines": CODE,
    "chinese": CHINESE,
    "emoji": "Launch 🚀 went well 👍🏽 — 😀😀",
    "unseen_scripts_byte_fallback": "Привет мир! مرحبا بالعالم नमस्ते 🦀 Ωμέγα ﷽",
    "leading_and_only_whitespace": "   \t  leading spaces",
    "only_newlines": "\n\n\n",
    "crlf_line_endings": "line one\r\nline two\r\n",
    "sentencepiece_space_marker_literal": "a▁b ▁▁ c▁",
    "lookalike_special_tokens": "<s> </s> <pad> <unk> <0x41>",
    "nul_and_control_chars": "a\x00b\x07c\x1bd",
    "empty": "",
}


@pytest.mark.parametrize("text", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_round_trip_is_exact_and_never_unknown(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c < 0xE000] + list(" \n\t▁")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
        assert UNK_ID not in ids


def test_unseen_characters_use_byte_pieces(tok):
    assert pieces(tok, "Ж") == ["<0xD0>", "<0x96>"]


def test_newline_is_its_own_piece_and_survives(tok):
    assert pieces(tok, "\n") == ["\n"]
    assert pieces(tok, "a\n\nb").count("\n") == 2


def test_digits_are_split(tok):
    # "12345" is frequent in the corpus: without split_digits BPE would merge it.
    assert pieces(tok, "12345") == list("12345")
    assert tok.decode(tok.encode("year 2024")) == "year 2024"


def test_indentation_uses_whitespace_pieces(tok):
    # allow_whitespace_only_pieces lets the 8-space indent be a few pieces, not 8.
    assert len(tok.encode("        return n")) < 8


# ----------------------------------------------------------------- special ids


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_bos_eos_added_on_request_and_skipped_by_decode(tok):
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tok.encode_batch(["hello"], bos=True, eos=True) == [ids]
    assert tok.decode([PAD_ID, *ids, PAD_ID]) == "hello"
    assert tok.decode(np.array(ids)) == "hello"


def test_decode_tolerates_ids_beyond_the_tokenizer(tok):
    # A model's vocab may be padded beyond the tokenizer's; sampling such an id must not crash.
    assert tok.decode([*tok.encode("ok"), tok.vocab_size + 5, -1]) == "ok ⁇  ⁇ "


# ----------------------------------------------------------------- persistence


def test_save_load_proto_pickle_equality(tok, tmp_path):
    path = tmp_path / "t.model"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tok and hash(loaded) == hash(tok)
    assert Tokenizer.from_proto(tok.proto()) == tok
    assert pickle.loads(pickle.dumps(tok)) == tok
    assert loaded.encode(CODE) == tok.encode(CODE)
    assert [p.name for p in tmp_path.iterdir()] == ["t.model"]  # no temp file left


def test_different_tokenizers_are_not_equal(tok, tmp_path):
    other = train_tokenizer(CORPUS[:8], VOCAB - 20, tmp_path)
    assert other != tok


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(DataError, match=r"bad\.model: not a valid SentencePiece model"):
        Tokenizer.load(bad)


def test_foreign_special_ids_are_rejected(tmp_path):
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=VOCAB,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,  # default ids: unk=0, bos=1, eos=2, pad=-1
    )
    with pytest.raises(DataError, match="special ids"):
        Tokenizer.from_proto(model.getvalue(), source="foreign.model")


# -------------------------------------------------------------------- training


def test_training_is_silent(tmp_path, capfd):
    train_tokenizer(CORPUS, VOCAB, tmp_path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_small_corpus_gives_smaller_vocab(tmp_path):
    tok = train_tokenizer(["tiny corpus, tiny corpus"] * 3, 5000, tmp_path)
    assert 261 < tok.vocab_size < 5000


def test_too_small_vocab_says_how_big(tmp_path):
    with pytest.raises(DataError, match=r"too small.*at least \d+"):
        train_tokenizer(CORPUS, 270, tmp_path)


def test_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(["", "\n\n", "   "], VOCAB, tmp_path)


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(DataError, match="model_type"):
        train_tokenizer(CORPUS, VOCAB, tmp_path, model_type="wordpiece")


def test_input_sentence_sampling_is_deterministic(tmp_path):
    corpus = [f"line {i} with some words {i * 7}\nand more {i % 13} text" for i in range(400)]
    a = train_tokenizer(corpus, VOCAB, tmp_path / "a", input_sentence_size=150)
    b = train_tokenizer(corpus, VOCAB, tmp_path / "b", input_sentence_size=150)
    assert a == b


# ----------------------------------------------------------------------- cache


def model_files(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_cache_reuses_model_without_retraining(tmp_path, monkeypatch):
    first = train_tokenizer(CORPUS, VOCAB, tmp_path)
    [name] = model_files(tmp_path)
    assert name.startswith("tokenizer-") and name.endswith(".model") and len(name) == len("tokenizer-.model") + 16
    mtime = os.stat(tmp_path / name).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache had the model")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    second = train_tokenizer(iter(CORPUS), VOCAB, tmp_path)
    assert second == first
    assert model_files(tmp_path) == [name]
    assert os.stat(tmp_path / name).st_mtime_ns == mtime


def test_cache_key_changes_with_inputs(tmp_path):
    train_tokenizer(CORPUS, VOCAB, tmp_path)
    train_tokenizer(CORPUS, VOCAB + 10, tmp_path)  # other vocab_size
    train_tokenizer(CORPUS + ["one more document"], VOCAB, tmp_path)  # other corpus
    train_tokenizer(CORPUS, VOCAB, tmp_path, model_type="unigram")  # other options
    assert len(model_files(tmp_path)) == 4


def test_fingerprint_hit_does_not_read_texts(tmp_path):
    train_tokenizer(CORPUS, VOCAB, tmp_path, fingerprint="corpus-v1")

    def exploding_texts():
        raise AssertionError("texts were read on a cache hit")
        yield  # pragma: no cover

    tok = train_tokenizer(exploding_texts(), VOCAB, tmp_path, fingerprint="corpus-v1")
    assert tok.decode(tok.encode(CODE)) == CODE


def test_failed_training_leaves_no_files(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train_tokenizer(CORPUS, VOCAB, tmp_path)
    assert model_files(tmp_path) == []  # neither a model nor the scratch lines file
