"""Judgments -> {prompt, chosen, rejected}: the export rules, the CLI, and the round trip into the
reward stage's loader (JSONL file, and data=feedback reading the database)."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from feedback_fixtures import ckpts  # noqa: F401  (session fixture)

from lmforge.data.feedback_export import ExportOptions, preference_records
from lmforge.data.feedback_store import Item, Store
from lmforge.data.templates import BadRecords
from lmforge.feedback.__main__ import main as feedback_main
from lmforge.feedback.agreement import agreement, krippendorff_alpha_nominal, win_rates

TEMPLATE = "User: {prompt}\nAssistant:"
SYS = ({"name": "1", "temperature": 0.7}, {"name": "2", "temperature": 1.2})


def add(store, item_id, prompt, a, b, k=0, swap=False):
    s1, s2 = (SYS[1], SYS[0]) if swap else SYS
    return store.add_item(Item(item_id, 0, k, prompt, TEMPLATE.format(prompt=prompt), a, b, s1, s2))


def judge(store, item_id, choice, who="alice"):
    store.add_judgment(f"{who}-{item_id}-{choice}-cid", item_id, who, choice)


def thumb(store, item_id, side, value, who="alice", n=[0]):  # noqa: B006 - a counter for ids
    n[0] += 1
    store.add_rating(f"rating-{n[0]:06d}", item_id, side, who, value, None)


@pytest.fixture
def db(tmp_path):
    """A small database covering every kind of label."""
    store = Store(tmp_path / "feedback.db")
    add(store, "item-one-0001", "What is 2 + 3?", " 5", " 6")
    add(store, "item-two-0002", "Reverse cat.", " tac", " cat", swap=True)
    add(store, "item-tie-0003", "Name a color.", " red", " blue")
    add(store, "item-bad-0004", "What is 9 * 7?", " 62", " 64")
    add(store, "item-thu-0005", "What is 9 * 7?", " 63", " 61", k=1)
    add(store, "item-emp-0006", "Say hi.", " hi", "")
    judge(store, "item-one-0001", "a")
    judge(store, "item-two-0002", "a")
    judge(store, "item-two-0002", "b", "bob")
    judge(store, "item-tie-0003", "tie")
    judge(store, "item-bad-0004", "both_bad")
    thumb(store, "item-thu-0005", "a", 1)  # " 63" up: chosen over the both-bad " 62" and " 64"
    thumb(store, "item-thu-0005", "b", 1)
    thumb(store, "item-thu-0005", "b", -1)  # changed their mind: " 61" down (the latest counts)
    judge(store, "item-emp-0006", "a")  # an empty response: the reward stage would refuse it
    return store


def triples(records):
    return [(r["prompt"], r["chosen"], r["rejected"], r["origin"]) for r in records]


def test_default_export_rules(db):
    res = preference_records(db)
    got = triples(res.records)
    assert got[:3] == [
        ("What is 2 + 3?", "5", "6", "judgment"),  # the response prefix " " is removed
        ("Reverse cat.", "tac", "cat", "judgment"),  # alice
        ("Reverse cat.", "cat", "tac", "judgment"),  # bob disagreed: both votes are pairs
    ]
    thumbs = sorted(got[3:])
    assert thumbs == sorted(
        [
            ("What is 9 * 7?", "63", "61", "thumbs"),
            ("What is 9 * 7?", "63", "62", "thumbs"),  # both bad = down-votes of both responses
            ("What is 9 * 7?", "63", "64", "thumbs"),
        ]
    )
    assert res.counts["excluded_tie"] == 1 and res.counts["excluded_both_bad"] == 1
    assert res.counts["skipped_empty_response"] == 1
    assert res.counts["pairs"] == 6
    assert all(r["item_id"] and r["annotator"] for r in res.records)


def test_kept_ties_are_mirrored_pairs(db):
    res = preference_records(db, ExportOptions(keep_ties=True, keep_both_bad=True, thumbs=False))
    got = triples(res.records)
    assert ("Name a color.", "red", "blue", "tie") in got and ("Name a color.", "blue", "red", "tie") in got
    assert ("What is 9 * 7?", "62", "64", "both_bad") in got and ("What is 9 * 7?", "64", "62", "both_bad") in got
    assert not any(o == "thumbs" for *_, o in got)


def test_majority_and_annotator_filter(db):
    judge(db, "item-two-0002", "b", "carol")  # now 2 of 3 prefer B
    res = preference_records(db, ExportOptions(aggregate="majority", thumbs=False))
    cat = [r for r in res.records if r["prompt"] == "Reverse cat."]
    assert [(r["chosen"], r["rejected"], r["annotator"]) for r in cat] == [("cat", "tac", "bob,carol")]
    only_bob = preference_records(db, ExportOptions(annotators=["bob"], thumbs=False))
    assert triples(only_bob.records) == [("Reverse cat.", "cat", "tac", "judgment")]


def test_statistics(db):
    js = db.judgments()
    a = agreement(js)
    assert a["items_multi"] == 1 and a["pairs"] == 1 and a["percent"] == 0.0
    # Krippendorff's alpha: perfect agreement 1, systematic disagreement < 0, undefined without variation
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == 1.0
    assert krippendorff_alpha_nominal([["a", "b"], ["b", "a"]]) < 0
    assert krippendorff_alpha_nominal([["a", "a"]]) is None
    assert krippendorff_alpha_nominal([["a"]]) is None
    rates = win_rates(js, {i.id: i for i in db.items()})
    # item-two shows system 2 on the left (swap): alice's "a" is a win of system 2
    assert rates["1"]["wins"] == 1 + 1 + 1 and rates["2"]["wins"] == 1
    assert rates["1"]["ties"] == 1 and rates["1"]["both_bad"] == 1


def test_export_cli_writes_the_jsonl(db, tmp_path, capsys):
    out = tmp_path / "out" / "pairs.jsonl"
    summary = feedback_main(["export", f"db={db.path}", f"out={out}", "keep_ties=true"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == summary["pairs"] == 8
    assert {"prompt", "chosen", "rejected"} <= set(lines[0])
    assert json.loads(capsys.readouterr().out.strip())["pairs"] == 8


def _reward_cfg(*overrides):
    return compose_config(["model=nano", "algo=reward", "logger=none", *overrides])


def test_round_trip_into_the_reward_loader(db, tmp_path, ckpts):  # noqa: F811
    """The exported file, read by the reward stage's own loader, gives back exactly the texts the
    models were shown and produced: rendered prompt + response."""
    from lmforge.data.preference_data import PreferenceBatching, load_preference_splits
    from lmforge.training.checkpoint import load_checkpoint

    out = tmp_path / "pairs.jsonl"
    feedback_main(["export", f"db={db.path}", f"out={out}"])
    cfg = _reward_cfg("data=jsonl", f"data.path={out}", f"data.val_path={out}", f"data.cache_dir={tmp_path}")
    tok = load_checkpoint(ckpts["lm"]).tokenizer
    splits = load_preference_splits(cfg.data, PreferenceBatching(4, 64, 2, 0), tok)
    assert splits.counts["train_pairs"] == 6 and splits.counts["skipped_records"] == 0
    texts = {(i.rendered_prompt + i.response_a) for i in db.items()} | {
        (i.rendered_prompt + i.response_b) for i in db.items()
    }
    for enc in splits.train:
        for ids in (enc.chosen, enc.rejected):
            assert ids[-1] == tok.eos_id
            assert tok.decode(ids) in texts


def test_data_feedback_reads_the_database_directly(db, tmp_path):
    """`algo=reward data=feedback data.db=...`: the same pairs as the exported file."""
    from hydra.core.config_store import ConfigStore

    from lmforge.data.config import DATA_SCHEMAS, FeedbackDataConfig
    from lmforge.data.preference_data import read_feedback_pairs
    from lmforge.data.preference_records import read_preference_file

    if "feedback" not in DATA_SCHEMAS:  # until lmforge.data.config registers it
        ConfigStore.instance().store(group="data", name="feedback_schema", node=FeedbackDataConfig)
    cfg = _reward_cfg("data=feedback", f"data.db={db.path}", f"data.cache_dir={tmp_path}")
    assert cfg.data.source == "feedback" and cfg.data.include_ties is False
    direct = read_feedback_pairs(cfg.data, BadRecords("error"))
    out = tmp_path / "pairs.jsonl"
    feedback_main(["export", f"db={db.path}", f"out={out}"])
    jsonl = _reward_cfg("data=jsonl", f"data.path={out}", f"data.cache_dir={tmp_path}").data
    from_file = read_preference_file(str(out), jsonl, BadRecords("error"))
    assert [(p.prompt, p.chosen, p.rejected) for p in direct] == [(p.prompt, p.chosen, p.rejected) for p in from_file]
    assert direct[0].prompt == "User: What is 2 + 3?\nAssistant:" and direct[0].chosen == " 5"
    ties = _reward_cfg("data=feedback", f"data.db={db.path}", "data.include_ties=true").data
    assert len(read_feedback_pairs(ties, BadRecords("error"))) == len(direct) + 2


def test_data_feedback_through_the_reward_datamodule(db, tmp_path, ckpts):  # noqa: F811
    from lmforge.data import preference_data
    from lmforge.data.config import DATA_SCHEMAS

    if "feedback" not in DATA_SCHEMAS:
        pytest.skip("lmforge.data.config.DATA_SCHEMAS has no 'feedback' source yet (the registration patch)")
    from lmforge.data.preference_data import read_feedback_pairs
    from lmforge.data.preference_records import is_val_prompt
    from lmforge.training.checkpoint import load_checkpoint

    rendered = sorted(
        {
            p.prompt
            for p in read_feedback_pairs(_reward_cfg("data=feedback", f"data.db={db.path}").data, BadRecords("error"))
        }
    )
    # a val_fraction that puts some prompts on each side (the split is by prompt hash)
    fraction = next(
        f / 100 for f in range(1, 100) if 0 < sum(is_val_prompt(p, f / 100) for p in rendered) < len(rendered)
    )
    cfg = _reward_cfg(
        "data=feedback", f"data.db={db.path}", f"data.val_fraction={fraction}", f"data.cache_dir={tmp_path}"
    )
    splits = preference_data.load_preference_splits(
        cfg.data, preference_data.PreferenceBatching(2, 64, 1, 0), load_checkpoint(ckpts["lm"]).tokenizer
    )
    assert splits.counts["train_pairs"] + len(splits.val) >= 2


def test_missing_database_is_a_clear_error(tmp_path):
    from lmforge.data.config import FeedbackDataConfig
    from lmforge.data.preference_data import read_feedback_pairs
    from lmforge.errors import DataError

    cfg = FeedbackDataConfig(db=str(tmp_path / "nope.db"))
    with pytest.raises(DataError, match="no such feedback database"):
        read_feedback_pairs(cfg, BadRecords("error"))
    not_db = tmp_path / "x.db"
    not_db.write_text("hello")
    with pytest.raises(DataError, match="not a feedback database"):
        read_feedback_pairs(FeedbackDataConfig(db=str(not_db)), BadRecords("error"))
