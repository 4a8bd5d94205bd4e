"""The offline preference stage (algo=dpo): which tokens are scored, the reference (per batch,
precomputed, absent for SimPO), that it learns, its config checks, and short runs on the
synthetic world and on a JSONL file, in fp32 and bf16-mixed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared RL helpers

from test_rollout import build_rl_assets  # noqa: E402

from lmforge.algos.dpo import DPOModule, build  # noqa: E402
from lmforge.data.preference_data import EncodedPair, collate_pairs  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.rl import logprobs_from_logits  # noqa: E402
from lmforge.run import main  # noqa: E402
from lmforge.training.checkpoint import CheckpointError, load_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


SYNTHETIC = ["data.n_docs=2000", "data.n_pairs=64", "data.n_eval=16"]


def dpo_config(assets, run_dir: Path, *overrides: str, data: list[str] = SYNTHETIC):
    return compose_config(
        [
            "algo=dpo",
            "model=nano",
            "logger=csv",
            "trainer.progress_bar=none",
            "trainer.accelerator=cpu",
            f"init_from={assets['policy']}",
            *data,
            f"data.cache_dir={assets['cache']}",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "trainer.log_every=1",
            "algo.batch_size=4",
            "algo.val_batches=2",
            "algo.eval_prompts=8",
            "algo.max_new_tokens=6",
            "algo.n_samples=2",
            *overrides,
        ],
        run_dir=run_dir,
    )


def hand_pairs() -> list[EncodedPair]:
    # prompt [5, 9] then responses; the second pair's chosen prompt is one token long
    return [
        EncodedPair([5, 9, 17, 2], [5, 9, 33, 40, 2], False, 2, 2),
        EncodedPair([7, 8, 2], [6, 7, 11, 2], False, 1, 2),
    ]


# ------------------------------------------------------------------ which tokens count


def test_response_mask_marks_exactly_the_response_and_eos():
    batch = collate_pairs(hand_pairs(), pad_id=0, response_mask=True)
    assert batch["response_mask"].int().tolist() == [
        [0, 0, 1, 1, 0],  # chosen 1: 17, EOS
        [0, 1, 1, 0, 0],  # chosen 2: 8, EOS
        [0, 0, 1, 1, 1],  # rejected 1: 33, 40, EOS
        [0, 0, 1, 1, 0],  # rejected 2: 11, EOS
    ]
    assert "ref_logps" not in batch
    assert "response_mask" not in collate_pairs(hand_pairs())  # the reward model's batches are unchanged


def test_response_logprobs_are_the_sum_over_response_tokens_of_per_sequence_scores(tmp_path, assets):
    module = DPOModule(dpo_config(assets, tmp_path), assets["tokenizer"])
    module.init_policy(assets["policy"])
    batch = collate_pairs(hand_pairs(), pad_id=assets["tokenizer"].pad_id, response_mask=True)
    with torch.no_grad():
        total, n = module.response_logprobs(module.model, batch)
        expected = []
        for seq, n_prompt in [(p.chosen, p.n_prompt_chosen) for p in hand_pairs()] + [
            (p.rejected, p.n_prompt_rejected) for p in hand_pairs()
        ]:
            ids = torch.tensor([seq])
            lp = logprobs_from_logits(module.model(ids)[:, :-1], ids[:, 1:])[0]
            expected.append(float(lp[n_prompt - 1 :].sum()))  # targets n_prompt .. end
    torch.testing.assert_close(total, torch.tensor(expected), atol=1e-4, rtol=1e-5)
    assert n.tolist() == [2, 2, 3, 2]


# ------------------------------------------------------------------ the reference


def test_loss_starts_at_log_2_and_precomputed_reference_gives_the_same_loss(tmp_path, assets):
    module = DPOModule(dpo_config(assets, tmp_path), assets["tokenizer"])
    module.init_policy(assets["policy"])
    pairs = hand_pairs()
    batch = collate_pairs(pairs, pad_id=assets["tokenizer"].pad_id, response_mask=True)
    with torch.no_grad():
        loss, stats = module.pair_loss(batch)
    assert float(loss) == pytest.approx(0.693147, abs=1e-5)  # policy == reference: h = 0
    with torch.no_grad():  # move the policy away from its reference
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with torch.no_grad():
        per_batch, _ = module.pair_loss(batch)
    ref = module.response_logprobs(module.ref_model, batch)[0].tolist()
    for i, p in enumerate(pairs):
        p.ref_logps = (ref[i], ref[len(pairs) + i])
    module.ref_model.forward = None  # precomputed: the reference must not run
    batch = collate_pairs(pairs, pad_id=assets["tokenizer"].pad_id, response_mask=True)
    assert batch["ref_logps"].shape == (4,)
    with torch.no_grad():
        precomputed, _ = module.pair_loss(batch)
    assert float(per_batch) != pytest.approx(0.693147, abs=1e-4)
    assert float(precomputed) == pytest.approx(float(per_batch), abs=1e-6)


def test_simpo_loss_never_runs_the_reference(tmp_path, assets):
    module = DPOModule(dpo_config(assets, tmp_path, "algo.loss=simpo", "algo.beta=2.0"), assets["tokenizer"])
    module.init_policy(assets["policy"])
    module.ref_model.forward = None
    loss, stats = module.pair_loss(collate_pairs(hand_pairs(), pad_id=0, response_mask=True))
    assert torch.isfinite(loss) and {"rewards_chosen", "reward_margin", "accuracy"} <= set(stats)


def test_the_reference_is_neither_trained_nor_saved(tmp_path, assets):
    module = DPOModule(dpo_config(assets, tmp_path), assets["tokenizer"])
    module.init_policy(assets["policy"])
    assert not any(k.startswith("ref") for k in module.state_dict())
    assert all(not p.requires_grad for p in module.ref_model.parameters())
    assert {id(p) for p in module.parameters()}.isdisjoint(id(p) for p in module.ref_model.parameters())


@pytest.mark.parametrize("loss_name", ["dpo", "ipo", "simpo"])
def test_each_loss_learns_to_prefer_the_chosen_responses(tmp_path, assets, loss_name):
    beta = {"dpo": 0.5, "ipo": 0.5, "simpo": 2.0}[loss_name]
    module = DPOModule(dpo_config(assets, tmp_path, f"algo.loss={loss_name}", f"algo.beta={beta}"), assets["tokenizer"])
    module.init_policy(assets["policy"])
    batch = collate_pairs(hand_pairs(), pad_id=0, response_mask=True)
    opt = torch.optim.Adam(module.model.parameters(), lr=3e-3)
    first, _ = module.pair_loss(batch)
    for _ in range(15):
        loss, stats = module.pair_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, stats = module.pair_loss(batch)
    assert float(last.detach()) < float(first.detach()) - 0.1
    assert float(stats["accuracy"]) == 1.0 and float(stats["reward_margin"]) > 0


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.loss=kto", "algo.loss='kto'"),
        ("algo.beta=0", "algo.beta=0"),
        ("algo.label_smoothing=0.5", "algo.label_smoothing=0.5"),
    ],
)
def test_bad_settings_fail_with_the_key(tmp_path, assets, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        build(dpo_config(assets, tmp_path, override), tmp_path)


def test_ipo_with_label_smoothing_and_no_init_from_are_refused(tmp_path, assets):
    with pytest.raises(ConfigError, match="IPO"):
        build(dpo_config(assets, tmp_path, "algo.loss=ipo", "algo.label_smoothing=0.1"), tmp_path)
    with pytest.raises(ConfigError, match="init_from"):
        build(dpo_config(assets, tmp_path, "init_from=null"), tmp_path)


def test_a_reward_checkpoint_is_refused_as_the_policy(tmp_path, assets):
    with pytest.raises(CheckpointError, match="'reward' checkpoint"):
        build(dpo_config(assets, tmp_path, f"init_from={assets['reward']}"), tmp_path)


# ------------------------------------------------------------------ runs


def logged_keys(run: Path) -> set[str]:
    import csv

    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    return {k for r in rows for k, v in r.items() if v}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_short_synthetic_run_logs_the_held_out_judge_and_kl(tmp_path, assets, precision):
    cfg = dpo_config(assets, tmp_path / "run", f"trainer.precision={precision}", "algo.precompute_ref=true")
    result = main(cfg)
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt.stage == "dpo" and ckpt.raw["global_step"] == 2
    assert not any(k.startswith("ref") for k in ckpt.state_dict)
    assert ckpt.meta["lineage"]["init_from"] == str(assets["policy"])
    keys = logged_keys(tmp_path / "run")
    for key in (
        "train/loss",
        "train/rewards_chosen",
        "train/rewards_rejected",
        "train/reward_margin",
        "train/accuracy",
        "train/logps_chosen",
        "val/loss",
        "val/accuracy",
        "val/reward_margin",
        "val/kl",
        "val/gt_score",
        "val/exact",
        "val/gt_score/add",
        "data/train_pairs",
    ):
        assert key in keys, sorted(keys)
    m = result["metrics"]
    assert m["val/kl"] >= 0 and 0.0 <= m["val/gt_score"] <= 1.0
    assert (tmp_path / "run" / "eval_samples.jsonl").exists()
    # lmforge.generate, score, winrate and convert sample a DPO checkpoint like any policy
    from lmforge.inference.language_model import LanguageModel

    assert LanguageModel(result["last_checkpoint"]).stage == "dpo"


def test_a_jsonl_preference_file_trains_and_evaluates_on_its_validation_prompts(tmp_path, assets):
    lines = [
        {"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a in range(1, 9)
        for b in range(1, 9)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = dpo_config(assets, tmp_path / "run", data=["data=jsonl", f"data.path={path}", "data.val_fraction=0.2"])
    result = main(cfg)
    m = result["metrics"]
    assert "val/kl" in m and "val/gt_score" not in m  # no judge for a user's file
    assert load_checkpoint(result["last_checkpoint"]).stage == "dpo"
