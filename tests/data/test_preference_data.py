"""Preference data: record parsing (jsonl, HH), bad records, left truncation, padding, batching."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lmforge.data.preference_data import (
    EncodedPair,
    PairStream,
    PreferenceBatching,
    collate_pairs,
    encode_preferences,
    load_preference_splits,
    pad_batch,
)
from lmforge.data.preference_records import (
    PreferencePair,
    parse_hh_record,
    parse_jsonl_record,
    read_preference_file,
    split_dialogue,
    synthetic_pairs,
)
from lmforge.data.templates import BadRecords
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import DataError
from lmforge.world.generator import SyntheticWorld

M = "\n\nAssistant:"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = SyntheticWorld(0).pretrain_documents(300)
    return train_tokenizer(docs, 400, tmp_path_factory.mktemp("tok"))


def jsonl_cfg(path, **kw):
    base = dict(
        source="jsonl",
        path=str(path),
        val_path=None,
        val_fraction=0.5,
        on_bad_record="error",
        prompt_field="prompt",
        chosen_field="chosen",
        rejected_field="rejected",
        prompt_template="User: {prompt}\nAssistant:",
        response_prefix=" ",
        assistant_marker=M,
    )
    return SimpleNamespace(**{**base, **kw})


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ------------------------------------------------------------------------ jsonl


def test_jsonl_record_renders_prompt_template_and_response_prefix():
    pair = parse_jsonl_record(
        {"q": "What is 2 + 3?", "good": "5", "bad": "6"},
        "f:1",
        BadRecords(),
        prompt_field="q",
        chosen_field="good",
        rejected_field="bad",
        prompt_template="User: {prompt}\nAssistant:",
        response_prefix=" ",
    )
    assert pair == PreferencePair("User: What is 2 + 3?\nAssistant:", " 5", " 6", "f:1")


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same "}, "identical"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty field 'chosen'"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty field 'prompt'"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "field 'rejected' is not a string"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "field 'chosen' is not a string"),
        ({"prompt": "p", "chosen": "a"}, "no field 'rejected'"),
    ],
)
def test_bad_jsonl_records_error_naming_the_line_or_are_counted(record, reason):
    with pytest.raises(DataError, match=reason) as e:
        parse_jsonl_record(record, "data.jsonl:7", BadRecords("error"))
    assert "data.jsonl:7" in str(e.value) and "on_bad_record=skip" in str(e.value)
    bad = BadRecords("skip")
    assert parse_jsonl_record(record, "data.jsonl:7", bad) is None
    assert sum(bad.counts.values()) == 1 and reason in next(iter(bad.counts))


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "a", "chosen": "x", "rejected": "y"},
            "",  # blank lines are fine
            '{"prompt": "b", "chosen": "x",',  # line 3: truncated JSON
            "[1, 2]",  # line 4: not an object
            {"prompt": "c", "chosen": "x", "rejected": "x"},  # line 5: identical
            {"prompt": "d", "chosen": "x", "rejected": "z"},
        ],
    )
    with pytest.raises(DataError, match=rf"{tmp_path / 'p.jsonl'}:3: malformed JSON"):
        read_preference_file(str(path), jsonl_cfg(path), BadRecords("error"))
    bad = BadRecords("skip")
    pairs = read_preference_file(str(path), jsonl_cfg(path), bad)
    assert [p.prompt for p in pairs] == ["User: a\nAssistant:", "User: d\nAssistant:"]
    assert [p.origin.rsplit(":", 1)[1] for p in pairs] == ["1", "6"]
    assert bad.counts == {"malformed JSON": 1, "line is not a JSON object": 1, "chosen and rejected are identical": 1}


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_preference_file(str(tmp_path / "nope.jsonl"), jsonl_cfg("x"), BadRecords())


# --------------------------------------------------------------------------- HH


def test_split_dialogue_at_the_last_assistant_turn():
    text = "\n\nHuman: hi" + M + " hello\n\nHuman: 2+2?" + M + " 4"
    assert split_dialogue(text, M) == ("\n\nHuman: hi" + M + " hello\n\nHuman: 2+2?" + M, " 4")
    assert split_dialogue("\n\nHuman: hi", M) is None


def test_hh_record_single_and_multi_turn():
    one = parse_hh_record(
        {"chosen": "\n\nHuman: hi" + M + " Hello!", "rejected": "\n\nHuman: hi" + M + " Go away."}, "hh:1", BadRecords()
    )
    assert (one.prompt, one.chosen, one.rejected) == ("\n\nHuman: hi" + M, " Hello!", " Go away.")
    prefix = "\n\nHuman: hi" + M + " Hello!\n\nHuman: what is 2+2?" + M
    multi = parse_hh_record({"chosen": prefix + " 4", "rejected": prefix + " 5"}, "hh:2", BadRecords())
    assert (multi.prompt, multi.chosen, multi.rejected) == (prefix, " 4", " 5")


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"chosen": "\n\nHuman: hi" + M + " a", "rejected": "\n\nHuman: hey" + M + " b"}, "differ before the last"),
        ({"chosen": "\n\nHuman: hi" + M + " a", "rejected": "\n\nHuman: hi there"}, "no assistant turn in 'rejected'"),
        ({"chosen": "\n\nHuman: hi" + M + "  ", "rejected": "\n\nHuman: hi" + M + " b"}, "empty final response"),
        ({"chosen": "\n\nHuman: hi" + M + " a", "rejected": "\n\nHuman: hi" + M + " a"}, "identical"),
    ],
)
def test_bad_hh_records(record, reason):
    with pytest.raises(DataError, match=reason):
        parse_hh_record(record, "hh.jsonl:3", BadRecords("error"))
    bad = BadRecords("skip")
    assert parse_hh_record(record, "hh.jsonl:3", bad) is None
    assert sum(bad.counts.values()) == 1


def test_hh_file_prompt_is_verbatim(tmp_path):
    path = write_lines(
        tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: x" + M + " y", "rejected": "\n\nHuman: x" + M + " z"}]
    )
    (pair,) = read_preference_file(str(path), jsonl_cfg(path, source="hh"), BadRecords())
    assert pair.prompt == "\n\nHuman: x" + M  # no template


# ---------------------------------------------------------------- tokenization


def test_long_prompt_is_cut_from_the_left_and_counted(tok):
    long = PreferencePair("User: " + "blah " * 200 + "What is 2 + 3?\nAssistant:", " 5", " 6", "f:1")
    short = PreferencePair("User: What is 2 + 3?\nAssistant:", " 5", " 6", "f:2")
    bad = BadRecords()
    encoded, kept, truncated = encode_preferences(tok, [long, short], 24, bad)
    assert truncated == 1 and kept == [0, 1]
    enc = encoded[0]
    assert enc.truncated and len(enc.chosen) == 24 and len(enc.rejected) == 24
    for seq, resp in ((enc.chosen, " 5"), (enc.rejected, " 6")):
        tail = tok.encode(resp) + [tok.eos_id]
        assert seq[-len(tail) :] == tail  # the response end and EOS survive
    prompt_ids = tok.encode(long.prompt)
    assert enc.chosen[: 24 - len(tail)] == prompt_ids[-(24 - len(tail)) :]  # the prompt's END is kept
    assert not encoded[1].truncated


def test_response_that_cannot_fit_is_a_bad_record(tok):
    pair = PreferencePair("User: hi\nAssistant:", " " + "very long answer " * 20, " ok", "f:9")
    with pytest.raises(DataError, match="f:9: response does not fit"):
        encode_preferences(tok, [pair], 16, BadRecords("error"))
    bad = BadRecords("skip")
    encoded, kept, _ = encode_preferences(tok, [pair], 16, bad)
    assert encoded == [] and kept == [] and bad.counts == {"response does not fit the context": 1}


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_puts_chosen_rows_first_then_rejected():
    batch = collate_pairs([EncodedPair([1, 2], [3], False), EncodedPair([4], [5, 6, 7], False)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [4, 0, 0], [3, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 1, 3]


# ------------------------------------------------------------------- streaming


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def stream(pairs, batch_size=2, start=0, rank=0, world=1, group=1):
    return PairStream(pairs, batch_size, 3, start, rank, world, group, collate=lambda b: [p.chosen[0] for p in b])


@pytest.mark.parametrize("group", [1, 3])
def test_pair_stream_visits_each_pair_once_per_epoch_and_resumes_exactly(group):
    pairs = [EncodedPair([i] * (1 + i % 4), [i + 100], False) for i in range(12)]
    full = _take(stream(pairs, group=group), 15)  # 2 pairs per batch: 6 batches per epoch
    assert sorted(sum(full[:6], [])) == list(range(12))
    assert sorted(sum(full[6:12], [])) == list(range(12))
    assert full[:6] != full[6:12]  # reshuffled each epoch
    assert _take(stream(pairs, start=5, group=group), 10) == full[5:15]  # resume at batch 5
    ranks = [_take(stream(pairs, rank=r, world=2, group=group), 3) for r in (0, 1)]
    assert sorted(sum(ranks[0] + ranks[1], [])) == list(range(12))  # ranks read disjoint pairs


def test_length_grouping_batches_pairs_of_similar_length():
    pairs = [EncodedPair([i] * (1 + 5 * (i % 2)), [i + 100], False) for i in range(16)]  # lengths 1 and 6
    grouped = _take(stream(pairs, batch_size=4, group=4), 4)
    assert all(len({i % 2 for i in b}) == 1 for b in grouped)  # each batch one length
    plain = _take(stream(pairs, batch_size=4, group=1), 4)
    assert any(len({i % 2 for i in b}) == 2 for b in plain)
    assert sorted(sum(grouped, [])) == sorted(sum(plain, [])) == list(range(16))


# ---------------------------------------------------------------------- splits


def test_jsonl_splits_keep_a_prompts_pairs_together_and_count(tmp_path, tok):
    records = [{"prompt": f"q{i % 8}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    path = write_lines(tmp_path / "p.jsonl", records + [{"prompt": "q1", "chosen": "same", "rejected": "same"}])
    cfg = jsonl_cfg(path, on_bad_record="skip")
    splits = load_preference_splits(cfg, PreferenceBatching(4, 32, 100, 0), tok)
    assert splits.counts["train_pairs"] + splits.counts["val_pairs"] == 40
    assert splits.counts["skipped_records"] == 1 and splits.judge == []
    train_prompts = {tok.decode(p.chosen).split("\n")[0] for p in splits.train}
    val_prompts = {tok.decode(p.chosen).split("\n")[0] for p in splits.val}
    assert train_prompts and val_prompts and not train_prompts & val_prompts


def test_synthetic_pairs_are_rerendered_with_the_configured_template():
    cfg = SimpleNamespace(seed=0, prompt_template="Q: {prompt}\nA:", response_prefix="  ")
    pairs = synthetic_pairs(cfg, 20, "val", 0.0)
    raw = SyntheticWorld(0).preference_pairs(20, "val")
    for p, r in zip(pairs, raw):
        assert p.prompt.startswith("Q: ") and p.prompt.endswith("\nA:") and "User:" not in p.prompt
        assert p.chosen == "  " + r["chosen"][1:] and p.rejected == "  " + r["rejected"][1:]
        assert p.kind and p.chosen_score > p.rejected_score


def test_synthetic_splits_hold_held_out_judge_pairs(tok):
    cfg = SimpleNamespace(
        source="synthetic",
        seed=0,
        n_pairs=30,
        n_eval=12,
        annotator_noise=0.0,
        prompt_template="User: {prompt}\nAssistant:",
        response_prefix=" ",
        on_bad_record="error",
    )
    splits = load_preference_splits(cfg, PreferenceBatching(4, 64, 2, 0), tok)
    assert splits.counts == {"train_pairs": 30, "val_pairs": 8, "truncated_pairs": 0, "skipped_records": 0}
    assert len(splits.judge) == len(splits.judge_pairs) == 12
    assert all(p.origin.startswith("synthetic:test:") for p in splits.judge_pairs)
    assert len(splits.judge_seen) == len(splits.judge_seen_pairs) == 12
    assert all(p.origin.startswith("synthetic:train+") for p in splits.judge_seen_pairs)
    assert torch.tensor([len(p.chosen) for p in splits.train]).max() <= 64


def test_unseen_pairs_are_new_pairs_of_training_prompts():
    from lmforge.data.preference_records import unseen_pairs
    from lmforge.world.splits import split_of
    from lmforge.world.tasks import strip_prompt_template

    cfg = SimpleNamespace(seed=0, prompt_template="User: {prompt}\nAssistant:", response_prefix=" ")
    trained = synthetic_pairs(cfg, 3000, "train", 0.0)
    keys = {(p.prompt, frozenset((p.chosen, p.rejected))) for p in trained}
    fresh = unseen_pairs(cfg, 200, trained)
    assert len(fresh) == 200
    assert all((p.prompt, frozenset((p.chosen, p.rejected))) not in keys for p in fresh)
    assert all(split_of(strip_prompt_template(p.prompt)) == "train" for p in fresh)
    assert all(p.chosen_score > p.rejected_score and p.kind for p in fresh)
    # without the exclusion a fresh stream repeats trained pairs: the filter does something
    again = synthetic_pairs(cfg, 200, "train", 0.0, seed_offset=1)
    assert sum((p.prompt, frozenset((p.chosen, p.rejected))) in keys for p in again) > 0  # 7 of 200
