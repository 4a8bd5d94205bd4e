"""On-policy preference pairs: the simulated annotator's verdicts on a policy's own samples
(`python -m lmforge.label`), and `data.extra_pairs`, which adds them to the reward stage's pairs."""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import pytest
from test_winrate import ckpts  # noqa: F401  (the module's nano checkpoints, a pytest fixture)

from lmforge.data.preference_data import PreferenceBatching, load_preference_splits
from lmforge.data.preference_records import extra_world_pairs
from lmforge.data.templates import BadRecords
from lmforge.errors import DataError
from lmforge.world.generator import SyntheticWorld, annotator_prefers_a
from lmforge.world.splits import split_of
from lmforge.world.tasks import parse_task

TASK = parse_task("What is 2 + 3?")  # a training prompt


def test_every_untied_pair_of_distinct_samples_is_labelled_by_hand():
    # Judge scores: " 5" 1.0, " 4" 0.24 (off by one), " 6" 0.24, " I don't know." 0.0, " 9" 0.06.
    responses = [" 5", " 4", " 5", " I don't know.", " 9", " 6"]
    pairs = SyntheticWorld(0).rank_samples(TASK, responses, 0.0, random.Random(0))
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    # 5 distinct responses: 10 pairs, less the tie (" 4", " 6"); the duplicate " 5" adds none.
    assert got == {
        (" 5", " 4"),
        (" 5", " I don't know."),
        (" 5", " 9"),
        (" 5", " 6"),
        (" 4", " I don't know."),
        (" 4", " 9"),
        (" 9", " I don't know."),
        (" 6", " I don't know."),
        (" 6", " 9"),
    }
    assert len(pairs) == 9
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert {p["prompt"] for p in pairs} == {"User: What is 2 + 3?\nAssistant:"}
    assert SyntheticWorld(0).rank_samples(TASK, [" 4", " 6", " 4"], 0.0, random.Random(0)) == []  # all tied


def test_the_annotator_is_bradley_terry_in_the_judge_score():
    rng = random.Random(0)
    assert annotator_prefers_a(0.3, 0.2, 0.0, rng) and not annotator_prefers_a(0.2, 0.3, 0.0, rng)
    # noise 0.1, a gap of 0.2: sigmoid(2) = 0.8808 of the draws pick A.
    n = 20000
    share = sum(annotator_prefers_a(0.6, 0.4, 0.1, rng) for _ in range(n)) / n
    assert share == pytest.approx(0.8808, abs=0.01)
    share = sum(annotator_prefers_a(0.4, 0.6, 0.1, rng) for _ in range(n)) / n
    assert share == pytest.approx(1 - 0.8808, abs=0.01)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        SyntheticWorld(0).rank_samples(TASK, [" 5", " 4"], -1.0, rng)


def test_label_writes_the_annotators_verdicts_on_a_policys_samples(ckpts, tmp_path, capsys):  # noqa: F811
    from lmforge.label import main

    out = tmp_path / "pairs.jsonl"
    args = [f"policy={ckpts['a']}", f"out={out}", "prompts=24", "samples=3", "max_new_tokens=4"]
    result = main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert json.loads(capsys.readouterr().out) == result
    assert result["prompts"] == 24 and result["responses"] == 72 and result["pairs"] == len(records) > 0
    assert len(records) + result["pairs_with_an_empty_response"] <= 24 * 3  # at most 3 pairs per prompt
    assert sum(result["pairs_by_kind"].values()) == len(records) and result["label_agreement"] == 1.0
    world = SyntheticWorld(0)
    for r in records:
        task = parse_task(r["prompt"])
        assert split_of(r["prompt"]) == "train" and r["prompt"] == task.prompt and r["kind"] == task.kind
        assert r["chosen_score"] > r["rejected_score"] and r["chosen"].strip() and r["rejected"].strip()
        # The scores are the judge's, of the response as sampled (with its leading space).
        assert world.rank_samples(task, [" " + r["chosen"], " " + r["rejected"]], 0.0, random.Random(0))[0][
            "chosen_score"
        ] == pytest.approx(r["chosen_score"])
    assert main(args) == result and [json.loads(x) for x in out.read_text().splitlines()] == records  # seeded


def test_label_user_errors_are_one_line(ckpts, tmp_path, capsys, monkeypatch):  # noqa: F811
    from lmforge.label import cli

    a, out = f"policy={ckpts['a']}", f"out={tmp_path / 'p.jsonl'}"
    for args, message in (
        ((a, out, "samples=1"), "samples=1 must be >= 2"),
        ((a, out, "temperature=0"), "temperature=0 samples the same response"),
        ((a, out, "prompts=0"), "prompts=0 must be >= 1"),
        ((a, out, "noise=-1"), "noise=-1.0 must be >= 0"),
        ((a, f"out={tmp_path}"), "is a directory"),
        ((a, out, "sample=3"), "unknown option 'sample'; options: policy, out,"),
        ((out,), "give policy=..."),
        ((f"policy={ckpts['reward']}", out), "error: ckpt="),  # a reward model has no LM head
    ):
        monkeypatch.setattr(sys, "argv", ["label", *args])
        assert cli() == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)
    assert not (tmp_path / "p.jsonl").exists()


def synthetic_cfg(extra):
    return SimpleNamespace(
        source="synthetic",
        seed=0,
        n_pairs=30,
        n_eval=4,
        annotator_noise=0.0,
        prompt_template="User: {prompt}\nAssistant:",
        response_prefix=" ",
        on_bad_record="error",
        extra_pairs=str(extra),
    )


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_extra_pairs_join_the_training_pairs_rendered_like_the_worlds(tmp_path):
    from lmforge.data.tokenizer import train_tokenizer

    records = [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "4", "chosen_score": 1.0, "rejected_score": 0.24},
        {"prompt": "Uppercase: lemon", "chosen": "LEMON", "rejected": "lemon"},  # scores are optional
    ]
    cfg = synthetic_cfg(write_jsonl(tmp_path / "extra.jsonl", records))
    pairs = extra_world_pairs(cfg, BadRecords("error"))
    assert [(p.prompt, p.chosen, p.rejected, p.kind) for p in pairs] == [
        ("User: What is 2 + 3?\nAssistant:", " 5", " 4", "add"),
        ("User: Uppercase: lemon\nAssistant:", " LEMON", " lemon", "upper"),
    ]
    assert (pairs[0].chosen_score, pairs[1].chosen_score) == (1.0, None)
    assert pairs[0].origin.endswith("extra.jsonl:1")
    tok = train_tokenizer(SyntheticWorld(0).pretrain_documents(200), 400, tmp_path / "tok")
    splits = load_preference_splits(cfg, PreferenceBatching(4, 64, 2, 0), tok)
    assert splits.counts["train_pairs"] == 30 + 2 and splits.counts["val_pairs"] == 8


def test_extra_pairs_on_held_out_prompts_are_refused(tmp_path):
    held_out = SyntheticWorld(0).all_tasks("test")[0]
    records = [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "4"},
        {"prompt": held_out.prompt, "chosen": held_out.answer, "rejected": "0"},
    ]
    cfg = synthetic_cfg(write_jsonl(tmp_path / "extra.jsonl", records))
    with pytest.raises(DataError, match=r"extra.jsonl:2: prompt .* is a held-out \(test\) prompt"):
        extra_world_pairs(cfg, BadRecords("error"))
    write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "Tell me a joke", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"extra.jsonl:1: not a task of the synthetic world"):
        extra_world_pairs(cfg, BadRecords("error"))
    bad = BadRecords("skip")
    assert extra_world_pairs(cfg, bad) == [] and bad.counts == {"not a task of the synthetic world": 1}
