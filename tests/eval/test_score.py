"""`python -m lmforge.score`: accuracy on held-out pairs, single and batch scores, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, compose_config

from lmforge.algos.pretrain import PretrainModule
from lmforge.errors import UsageError
from lmforge.eval.reward_scoring import RewardScorer
from lmforge.run import main as train_main
from lmforge.score import cli, main, parse_args
from lmforge.training.checkpoint import CheckpointError, load_checkpoint
from lmforge.world.generator import SyntheticWorld
from lmforge.world.tasks import strip_prompt_template

SMOKE = ["experiment=smoke", "algo=reward", "logger=none", "trainer.progress_bar=none"]


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory, shared_cache) -> str:
    """A reward model trained for a few steps from scratch (no init_from: the data's tokenizer)."""
    run = tmp_path_factory.mktemp("rm")
    cfg = compose_config(
        [
            *SMOKE,
            "trainer.max_steps=4",
            "trainer.eval_every=2",
            "algo.batch_size=8",
            "algo.val_batches=2",
            "data.n_pairs=128",
            "data.n_eval=16",
            f"data.cache_dir={shared_cache}",
        ],
        run_dir=run,
    )
    return train_main(cfg)["last_checkpoint"]


def held_out_pairs(n=12):
    """World "test" pairs in the jsonl format: raw prompts, responses without the prefix space
    (pairs with an empty response left out: an empty field is a bad jsonl record)."""
    pairs = [
        {"prompt": strip_prompt_template(p["prompt"]), "chosen": p["chosen"][1:], "rejected": p["rejected"][1:]}
        for p in SyntheticWorld(0).preference_pairs(3 * n, "test")
    ]
    return [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()][:n]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_argument_errors():
    with pytest.raises(UsageError, match="ckpt=<reward checkpoint> is required"):
        parse_args(["input=x.jsonl"])
    with pytest.raises(UsageError, match="unknown option 'inptu'"):
        parse_args(["ckpt=a", "inptu=x"])
    with pytest.raises(UsageError, match="expected key=value"):
        parse_args(["ckpt=a", "oops"])
    assert parse_args(["ckpt=a", "prompt=x=y"])["prompt"] == "x=y"


def test_a_non_reward_checkpoint_is_refused(tmp_path, shared_cache):
    cfg = compose_config(["experiment=smoke", f"data.cache_dir={shared_cache}"], run_dir=tmp_path)
    from lmforge.data.pretrain_data import load_or_train_tokenizer

    module = PretrainModule(cfg, load_or_train_tokenizer(cfg.data))
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": module.state_dict(), "lmforge": module.checkpoint_metadata()}, path)
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint; scoring needs a reward model"):
        main([f"ckpt={path}", "prompt=hi", "response=there"])


def test_single_response_raw_and_normalized(reward_ckpt):
    out = main([f"ckpt={reward_ckpt}", "prompt=What is 2 + 3?", "response=5"])
    stats = load_checkpoint(reward_ckpt).meta["reward_stats"]
    assert out["reward_normalized"] == pytest.approx((out["reward"] - stats["mean"]) / stats["std"])
    # rendered as in training: the template around the prompt, the prefix before the response
    scorer = RewardScorer(reward_ckpt)
    assert scorer.render("What is 2 + 3?", "5") == ("User: What is 2 + 3?\nAssistant:", " 5")
    raw = RewardScorer(reward_ckpt, raw=True)
    assert out["reward"] == pytest.approx(raw.score("User: What is 2 + 3?\nAssistant:", " 5"), abs=1e-5)
    assert out["reward"] != pytest.approx(raw.score("What is 2 + 3?", "5"), abs=1e-5)


def test_accuracy_on_held_out_pairs(reward_ckpt, tmp_path):
    pairs = held_out_pairs()
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = main([f"ckpt={reward_ckpt}", f"input={path}"])
    scorer = RewardScorer(reward_ckpt)
    diffs = [scorer.score(p["prompt"], p["chosen"]) - scorer.score(p["prompt"], p["rejected"]) for p in pairs]
    assert out["n"] == len(pairs) and out["skipped"] == 0
    assert out["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
    assert out["margin_mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)


def test_custom_field_names_and_skipped_records(reward_ckpt, tmp_path):
    pairs = [{"q": p["prompt"], "good": p["chosen"], "bad": p["rejected"]} for p in held_out_pairs(5)]
    pairs.append({"q": "x", "good": "same", "bad": "same"})
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = [f"ckpt={reward_ckpt}", f"input={path}", "prompt_field=q", "chosen_field=good", "rejected_field=bad"]
    with pytest.raises(Exception, match=r"pairs.jsonl:6: chosen and rejected are identical"):
        main(args)
    out = main([*args, "on_bad_record=skip"])
    assert out["n"] == 5 and out["skipped"] == 1


def test_batch_scores_match_single_scores(reward_ckpt, tmp_path):
    records = [
        {"prompt": "What is 2 + 3?", "response": "5", "id": 1},
        {"prompt": "Uppercase: lemon", "response": "I don't know. " * 3, "id": 2},
    ]
    path = write_jsonl(tmp_path / "responses.jsonl", records)
    out = main([f"ckpt={reward_ckpt}", f"input={path}", f"output={tmp_path / 'scores.jsonl'}"])
    assert out["n"] == 2 and out["output"] == str(tmp_path / "scores.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    scorer = RewardScorer(reward_ckpt)
    for rec, row in zip(records, rows):
        assert row["id"] == rec["id"]
        assert row["reward"] == pytest.approx(scorer.score(rec["prompt"], rec["response"]), abs=1e-5)
        assert row["reward_normalized"] == pytest.approx(scorer.normalize(row["reward"]))


def test_command_line(reward_ckpt, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", held_out_pairs(4))
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.score", f"ckpt={reward_ckpt}", f"input={path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n"] == 4


def test_errors_become_messages_and_exit_codes(tmp_path, capsys):
    assert cli([f"ckpt={tmp_path / 'missing.ckpt'}", "prompt=a", "response=b"]) == 1
    assert "no such checkpoint file" in capsys.readouterr().err
    assert cli(["prompt=a"]) == 2
    assert "ckpt=<reward checkpoint> is required" in capsys.readouterr().err


def test_agreement_with_the_noiseless_judge_on_synthetic_pairs(reward_ckpt):
    from lmforge.data.preference_records import synthetic_pairs
    from lmforge.data.templates import encode_pair

    out = main([f"ckpt={reward_ckpt}", "input=synthetic:test:40"])
    scorer = RewardScorer(reward_ckpt)
    cfg = load_checkpoint(reward_ckpt).meta["config"]["data"]
    pairs = synthetic_pairs(SimpleNamespace(**cfg), 40, "test", 0.0)
    assert all(p.chosen_score > p.rejected_score for p in pairs)  # chosen = the judge's choice

    def reward(prompt, response):  # one at a time, unpadded
        return scorer.rewards([encode_pair(scorer.tokenizer, prompt, response, scorer.seq_len).ids])[0]

    diffs = [reward(p.prompt, p.chosen) - reward(p.prompt, p.rejected) for p in pairs]
    assert out["n"] == 40 and out["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / 40)
    kinds = {p.kind for p in pairs}
    assert set(out["by_kind"]) == kinds
    for kind in kinds:
        own = [d > 0 for d, p in zip(diffs, pairs) if p.kind == kind]
        assert out["by_kind"][kind] == pytest.approx(sum(own) / len(own), abs=1e-4)


def test_agreement_on_the_hard_split_by_kind(reward_ckpt):
    from lmforge.eval.reward_scoring import synthetic_judge_pairs
    from lmforge.world.splits import split_of

    pairs = synthetic_judge_pairs(RewardScorer(reward_ckpt), "synthetic:hard:30")
    assert len(pairs) == 30 and all(split_of(strip_prompt_template(p.prompt)) == "hard" for p in pairs)
    assert all(p.origin.startswith("synthetic:hard:") for p in pairs)
    out = main([f"ckpt={reward_ckpt}", "input=synthetic:hard:30"])
    assert out["n"] == 30 and set(out["by_kind"]) == {p.kind for p in pairs}
    assert set(out["by_kind"]) <= {"add", "sub", "mul", "compare", "next"}  # no word kind is hard


def test_seen_synthetic_pairs_are_training_prompts_the_run_did_not_train_on(reward_ckpt):
    from lmforge.data.preference_records import synthetic_pairs
    from lmforge.eval.reward_scoring import synthetic_judge_pairs
    from lmforge.world.splits import split_of

    scorer = RewardScorer(reward_ckpt)
    cfg = load_checkpoint(reward_ckpt).meta["config"]["data"]
    trained = synthetic_pairs(SimpleNamespace(**cfg), cfg["n_pairs"], "train", cfg["annotator_noise"])
    keys = {(p.prompt, frozenset((p.chosen, p.rejected))) for p in trained}
    pairs = synthetic_judge_pairs(scorer, "synthetic:seen:50")
    assert len(pairs) == 50
    assert not any((p.prompt, frozenset((p.chosen, p.rejected))) in keys for p in pairs)
    assert all(split_of(strip_prompt_template(p.prompt)) == "train" for p in pairs)
    assert main([f"ckpt={reward_ckpt}", "input=synthetic:seen:50"])["n"] == 50
    for bad in ("synthetic:val", "synthetic:test:x", "synthetic:seen:0", "synthetic:hard:0"):
        with pytest.raises(UsageError, match="use synthetic:test, synthetic:hard or synthetic:seen"):
            main([f"ckpt={reward_ckpt}", f"input={bad}"])


def test_seen_pairs_leave_out_the_runs_extra_pairs_too(reward_ckpt, tmp_path):
    from lmforge.eval.reward_scoring import synthetic_judge_pairs

    scorer = RewardScorer(reward_ckpt)
    fresh = synthetic_judge_pairs(scorer, "synthetic:seen:20")
    # The run had also trained on the first of those (data.extra_pairs): it is no longer new.
    first = fresh[0]
    record = {
        "prompt": strip_prompt_template(first.prompt),
        "chosen": first.chosen[1:],
        "rejected": first.rejected[1:],
    }
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps(record) + "\n")
    scorer.data_config = {**scorer.data_config, "extra_pairs": str(extra)}
    again = synthetic_judge_pairs(scorer, "synthetic:seen:20")
    assert len(again) == 20 and (first.prompt, first.chosen, first.rejected) not in {
        (p.prompt, p.chosen, p.rejected) for p in again
    }
    extra.unlink()
    with pytest.raises(UsageError, match="also trained on data.extra_pairs=.*which is gone"):
        synthetic_judge_pairs(scorer, "synthetic:seen:20")
