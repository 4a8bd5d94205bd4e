"""SFT data: templates, loss masks, EOS, left truncation, bad records, splits and bucketing."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from lmforge.data.sft_data import (
    IGNORE_INDEX,
    EncodeStats,
    Pair,
    TrainBatches,
    collate,
    encode_pairs,
    jsonl_pairs,
    load_pairs,
    plan_epoch,
    plan_eval,
    split_by_hash,
    synthetic_pairs,
)
from lmforge.data.templates import BadRecords
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import DataError
from lmforge.world.generator import SyntheticWorld
from lmforge.world.splits import split_of

TEMPLATE = "User: {prompt}\nAssistant:"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = SyntheticWorld(0).pretrain_documents(300)
    return train_tokenizer(docs, 400, tmp_path_factory.mktemp("tok"))


def jsonl_cfg(path, **kw):
    base = dict(
        source="jsonl",
        path=str(path),
        val_path=None,
        val_fraction=0.2,
        prompt_field="prompt",
        response_field="response",
        prompt_template=TEMPLATE,
        response_prefix=" ",
        on_bad_record="error",
    )
    base.update(kw)
    return SimpleNamespace(**base)


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# ------------------------------------------------------------------ labels and EOS


def test_labels_supervise_exactly_the_response_and_eos(tok):
    pair = Pair(TEMPLATE.format(prompt="What is 7 + 12?"), " 19", "t:1")
    (ex,) = encode_pairs([pair], tok, 64, BadRecords())
    p, r = tok.encode(pair.prompt), tok.encode(pair.response)
    assert ex.ids == p + r + [tok.eos_id]
    assert ex.n_prompt == len(p)
    batch = collate([ex], tok.pad_id)
    x, y = batch["input_ids"][0], batch["labels"][0]
    assert x.tolist() == ex.ids[:-1]
    supervised = (y != IGNORE_INDEX).nonzero().flatten().tolist()
    # Inputs at positions n_prompt-1 .. end predict the response tokens and then EOS.
    assert supervised == list(range(len(p) - 1, len(ex.ids) - 1))
    assert y[supervised].tolist() == r + [tok.eos_id]
    assert y[supervised[-1]].item() == tok.eos_id  # EOS is the last supervised target


def test_padding_is_masked_and_on_the_right(tok):
    pairs = [
        Pair(TEMPLATE.format(prompt=q), " " + a, f"t:{i}")
        for i, (q, a) in enumerate(
            [("What is 1 + 1?", "2"), ("Reverse the word: lemon", "nomel"), ("Uppercase: cat", "CAT")]
        )
    ]
    exs = encode_pairs(pairs, tok, 64, BadRecords())
    b = collate(exs, tok.pad_id)
    T = max(len(e.ids) - 1 for e in exs)
    assert b["input_ids"].shape == (3, T)
    for row, e in enumerate(exs):
        n = len(e.ids) - 1
        assert b["attention_mask"][row].tolist() == [True] * n + [False] * (T - n)
        assert (b["input_ids"][row, n:] == tok.pad_id).all()
        assert (b["labels"][row, n:] == IGNORE_INDEX).all()
        assert (b["labels"][row, : e.n_prompt - 1] == IGNORE_INDEX).all()
        # Every row's last real target is its EOS.
        assert b["labels"][row, n - 1].item() == tok.eos_id


def test_long_prompt_is_cut_from_the_left_keeping_response_and_eos(tok, caplog):
    long_prompt = TEMPLATE.format(prompt="What is 7 + 12? " * 30)
    pair = Pair(long_prompt, " 19", "t:1")
    short = Pair(TEMPLATE.format(prompt="What is 7 + 12?"), " 19", "t:2")
    stats = EncodeStats()
    seq_len = 24
    exs = encode_pairs([pair, short], tok, seq_len, BadRecords(), stats)
    assert stats.n_truncated == 1 and stats.n_examples == 2
    ex = exs[0]
    r = tok.encode(" 19") + [tok.eos_id]
    assert len(ex.ids) == seq_len + 1  # the model reads seq_len of them
    assert ex.ids[-len(r) :] == r  # the whole response and EOS survive
    assert ex.ids[: ex.n_prompt] == tok.encode(long_prompt)[-ex.n_prompt :]  # the prompt's END is kept
    assert len(collate([ex], tok.pad_id)["input_ids"][0]) == seq_len


def test_truncations_are_counted_and_logged_by_the_datamodule(tok, tmp_path, caplog):
    from lmforge.data.sft_data import SFTBatching, SFTDataModule

    rows = [{"prompt": "What is 7 + 12? " * (30 if i % 3 == 0 else 1), "response": "19"} for i in range(12)]
    cfg = jsonl_cfg(write_jsonl(tmp_path / "d.jsonl", rows), val_fraction=0.3)
    dm = SFTDataModule(cfg, SFTBatching(4, 24, 2, 0), tok)
    with caplog.at_level(logging.INFO, logger="lmforge.data.sft_data"):
        dm.prepare_data()
    stats = dm.data_stats()
    assert stats["data/train_truncated"] + stats["data/val_truncated"] == 4
    assert "truncated from the left" in caplog.text


def test_response_longer_than_context_is_a_bad_record(tok):
    pair = Pair(TEMPLATE.format(prompt="Say it"), " " + "word " * 40, "f.jsonl:7")
    with pytest.raises(DataError, match=r"f\.jsonl:7: response longer than the context"):
        encode_pairs([pair], tok, 16, BadRecords("error"))
    bad = BadRecords("skip")
    stats = EncodeStats()
    assert encode_pairs([pair, Pair(TEMPLATE.format(prompt="a"), " b", "f.jsonl:8")], tok, 16, bad, stats)
    assert bad.counts == {"response longer than the context": 1} and stats.n_too_long == 1


# ------------------------------------------------------------------ sources


def test_synthetic_pairs_use_the_configured_template_and_splits():
    cfg = SimpleNamespace(
        source="synthetic",
        seed=0,
        n_sft=50,
        prompt_template="Q: {prompt}\nA:",
        response_prefix="  ",
        on_bad_record="error",
    )
    train, val = load_pairs(cfg, 20)
    assert len(train) == 50 and len(val) == 20
    world = SyntheticWorld(0)
    expected = world.tasks(50, "train")
    assert [p.prompt for p in train] == [f"Q: {t.prompt}\nA:" for t in expected]
    assert [p.response for p in train] == ["  " + t.answer for t in expected]
    assert {split_of(p.raw_prompt) for p in train} == {"train"}
    assert {split_of(p.raw_prompt) for p in val} == {"val"}
    assert synthetic_pairs(cfg, "train", 50)[0] == train[0]  # deterministic


def test_jsonl_pairs_fields_template_and_val_path(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"q": "Hi?", "a": "Hello."}, {"q": "Bye?", "a": "Bye."}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"q": "Yo?", "a": "Yo."}])
    cfg = jsonl_cfg(path, prompt_field="q", response_field="a", val_path=str(val))
    train, v = load_pairs(cfg, 10)
    assert [(p.prompt, p.response, p.origin) for p in train] == [
        ("User: Hi?\nAssistant:", " Hello.", f"{path}:1"),
        ("User: Bye?\nAssistant:", " Bye.", f"{path}:2"),
    ]
    assert [p.origin for p in v] == [f"{val}:1"]


def test_val_fraction_split_is_deterministic_disjoint_and_keeps_prompts_together(tmp_path):
    rows = [{"prompt": f"question {i % 40}", "response": f"answer {i}"} for i in range(200)]
    cfg = jsonl_cfg(write_jsonl(tmp_path / "a.jsonl", rows), val_fraction=0.2)
    train, val = load_pairs(cfg, 1000)
    train2, val2 = load_pairs(cfg, 1000)
    assert [p.origin for p in val] == [p.origin for p in val2] and [p.origin for p in train] == [
        p.origin for p in train2
    ]
    assert len(train) + len(val) == 200 and 0 < len(val) < 200
    assert not {p.raw_prompt for p in train} & {p.raw_prompt for p in val}  # no prompt in both splits
    # A tiny file still gets one validation record.
    tr, va = split_by_hash([Pair("a", "b", "x", "a"), Pair("c", "d", "y", "c")], 0.01)
    assert len(tr) == 1 and len(va) == 1


BAD_LINES = [
    ('{"prompt": "ok", "response": "fine"}', None, None),
    ("{not json", "unreadable line", "malformed JSON"),
    ('["a", "list"]', "unreadable line", "expected a JSON object"),
    ('{"prompt": "", "response": "x"}', "empty prompt", "'prompt'"),
    ('{"prompt": "x", "response": "   "}', "empty response", "'response'"),
    ('{"prompt": 3, "response": "x"}', "non-string prompt", "int"),
    ('{"prompt": "x", "response": null}', "non-string response", "null"),
    ('{"prompt": "x"}', "missing field", "no field 'response' (data.response_field)"),
]


@pytest.mark.parametrize("i", range(1, len(BAD_LINES)))
def test_each_bad_record_is_an_error_naming_file_and_line(tmp_path, i):
    line, reason, detail = BAD_LINES[i]
    # The bad line is line 3 (after a good line and a blank one).
    path = tmp_path / "d.jsonl"
    path.write_text(BAD_LINES[0][0] + "\n\n" + line + "\n" + BAD_LINES[0][0] + "\n")
    with pytest.raises(DataError) as e:
        jsonl_pairs(jsonl_cfg(path), str(path), BadRecords("error"))
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: {reason}"), msg
    assert detail in msg and "data.on_bad_record=skip" in msg


def test_bad_records_are_skipped_counted_and_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [ln for ln, _, _ in BAD_LINES] + [BAD_LINES[0][0]])
    bad = BadRecords("skip")
    pairs = jsonl_pairs(jsonl_cfg(path), str(path), bad)
    assert [p.origin for p in pairs] == [f"{path}:1", f"{path}:{len(BAD_LINES) + 1}"]
    assert bad.counts == {
        "unreadable line": 2,
        "empty prompt": 1,
        "empty response": 1,
        "non-string prompt": 1,
        "non-string response": 1,
        "missing field": 1,
    }
    assert bad.examples["unreadable line"].startswith(f"{path}:2: unreadable line")
    with caplog.at_level(logging.WARNING):
        bad.log_summary("SFT records")
    assert "skipped 2 record(s): unreadable line" in caplog.text


def test_no_usable_record_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "", "response": "x"}'])
    with pytest.raises(DataError, match="no usable prompt/response pair"):
        jsonl_pairs(jsonl_cfg(path), str(path), BadRecords("skip"))
    with pytest.raises(DataError, match="file not found"):
        jsonl_pairs(jsonl_cfg(tmp_path / "nope.jsonl"), str(tmp_path / "nope.jsonl"), BadRecords("skip"))


def test_pretraining_only_sources_are_refused():
    with pytest.raises(DataError, match="no prompt/response pairs for SFT"):
        load_pairs(SimpleNamespace(source="text", on_bad_record="error"), 4)


# ------------------------------------------------------------------ batching


def _padding(plan, lengths):
    real = sum(lengths[i] for b in plan for i in b)
    total = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    return 1 - real / total


@pytest.mark.parametrize("packing", ["bucket", "none"])
def test_epoch_plan_covers_every_example_once_and_is_deterministic(packing):
    lengths = [(i * 37) % 50 + 5 for i in range(1000)]
    plan = plan_epoch(lengths, 16, packing, seed=3, epoch=0, bucket_size=8)
    assert sorted(i for b in plan for i in b) == list(range(1000))
    assert plan == plan_epoch(lengths, 16, packing, seed=3, epoch=0, bucket_size=8)
    assert plan != plan_epoch(lengths, 16, packing, seed=3, epoch=1, bucket_size=8)


def test_bucketing_cuts_padding():
    lengths = [(i * 37) % 50 + 5 for i in range(1000)]
    bucket = _padding(plan_epoch(lengths, 16, "bucket", 0, 0, 16), lengths)
    none = _padding(plan_epoch(lengths, 16, "none", 0, 0), lengths)
    assert bucket < 0.05 < 0.3 < none
    assert _padding(plan_eval(lengths, 16, "bucket"), lengths) < 0.01


def test_train_batches_are_a_function_of_the_batch_number(tok):
    pairs = [
        Pair(TEMPLATE.format(prompt=t.prompt), " " + t.answer, str(i))
        for i, t in enumerate(SyntheticWorld(0).tasks(40))
    ]
    exs = encode_pairs(pairs, tok, 64, BadRecords())
    full = TrainBatches(exs, 8, "bucket", 0, tok.pad_id)
    it = iter(full)
    first = [next(it) for _ in range(12)]  # crosses the epoch boundary (5 batches per epoch)
    resumed = iter(TrainBatches(exs, 8, "bucket", 0, tok.pad_id, start_batch=7))
    for k in range(7, 12):
        got = next(resumed)
        assert all(torch.equal(got[key], first[k][key]) for key in got)
    # Two ranks read disjoint batches: rank r reads global batches r, r + 2, ...
    r1 = iter(TrainBatches(exs, 8, "bucket", 0, tok.pad_id, rank=1, world_size=2))
    assert torch.equal(next(r1)["input_ids"], first[1]["input_ids"])
