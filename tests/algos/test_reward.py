"""The reward-model stage: where the reward is read, the Bradley-Terry wiring, init_from, and the
reward statistics stored in the checkpoint."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, train_py_cmd

from lmforge.algos.pretrain import PretrainModule
from lmforge.algos.reward import RewardModule
from lmforge.data.preference_data import EncodedPair, collate_pairs, pad_batch
from lmforge.data.tokenizer import train_tokenizer
from lmforge.run import main
from lmforge.training.checkpoint import CheckpointError, load_checkpoint
from lmforge.world.generator import SyntheticWorld

SMOKE = ["experiment=smoke", "algo=reward", "logger=none", "trainer.progress_bar=none"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(SyntheticWorld(0).pretrain_documents(300), 512, tmp_path_factory.mktemp("tok"))


def make_module(tmp_path, tok, *overrides) -> RewardModule:
    torch.manual_seed(0)
    return RewardModule(compose_config([*SMOKE, *overrides], run_dir=tmp_path), tok)


def save_pretrain_ckpt(tmp_path, tok, *overrides) -> Path:
    """A pretraining checkpoint as the stage writes it (the parts load_checkpoint reads)."""
    torch.manual_seed(1)
    module = PretrainModule(compose_config(["experiment=smoke", *overrides], run_dir=tmp_path), tok)
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": module.state_dict(), "lmforge": module.checkpoint_metadata()}, path)
    return path


# ------------------------------------------------------------ where the reward is read


def test_reward_is_read_at_the_last_real_token_with_left_or_right_padding(tmp_path, tok):
    module = make_module(tmp_path, tok).eval()
    seqs = [[5, 9, 17, 33, 2], [7, 8, 2], [11, 2]]
    with torch.no_grad():
        alone = torch.stack([module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
        right = module(*pad_batch(seqs, tok.pad_id, "right"))
        left = module(*pad_batch(seqs, tok.pad_id, "left"))
        # what a reader of the last column would get instead: different for padded rows
        ids, mask = pad_batch(seqs, tok.pad_id, "right")
        last_column = module.model(ids, attention_mask=mask)[:, -1]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(last_column[1:], alone[1:], atol=1e-3)


# ------------------------------------------------------------------ Bradley-Terry


def test_loss_on_a_hand_made_batch_matches_the_hand_computed_value(tmp_path, tok):
    module = make_module(tmp_path, tok, "algo.margin=0.5", "algo.center_coef=0.1")
    calls = []

    def fake_forward(ids, mask):  # rewards: chosen rows first, then rejected rows
        calls.append(ids.shape)
        return torch.tensor([2.0, 0.0, 1.0, 1.0])

    module.forward = fake_forward
    batch = collate_pairs([EncodedPair([4, 5], [6], False), EncodedPair([7], [8, 9], False)], tok.pad_id)
    loss, stats, _ = module.pair_loss(batch)
    # r_c = [2, 0], r_r = [1, 1]: diffs [1, -1], minus margin 0.5 -> [0.5, -1.5]
    bt = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2
    center = 0.1 * ((2 + 1) ** 2 + (0 + 1) ** 2) / 2
    assert loss.item() == pytest.approx(bt + center, rel=1e-6)
    assert stats["accuracy"].item() == 0.5 and stats["margin_mean"].item() == 0.0
    assert calls == [torch.Size([4, 2])]  # chosen and rejected in ONE forward pass


def test_loss_matches_per_sequence_rewards(tmp_path, tok):
    module = make_module(tmp_path, tok).eval()
    pairs = [EncodedPair([5, 9, 17, 2], [5, 9, 2], False), EncodedPair([7, 2], [7, 8, 8, 8, 2], False)]
    with torch.no_grad():
        loss, stats, rewards = module.pair_loss(collate_pairs(pairs, tok.pad_id))

        def r(seq):
            return module(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]

        r_c = torch.stack([r(p.chosen) for p in pairs])
        r_r = torch.stack([r(p.rejected) for p in pairs])
    torch.testing.assert_close(loss, -F.logsigmoid(r_c - r_r).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards, torch.cat([r_c, r_r]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- init_from


def test_init_from_copies_the_backbone_and_keeps_a_fresh_head(tmp_path, tok):
    path = save_pretrain_ckpt(tmp_path, tok)
    module = make_module(tmp_path, tok)
    head_before = module.model.head.weight.detach().clone()
    module.init_backbone_from(str(path))
    ckpt = load_checkpoint(path)
    for k, v in module.model.backbone.state_dict().items():
        torch.testing.assert_close(v, ckpt.state_dict[f"model.backbone.{k}"], rtol=0, atol=0)
    torch.testing.assert_close(module.model.head.weight, head_before, rtol=0, atol=0)
    assert module.lineage["init_from"] == str(path)


def test_init_from_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path, tok):
    path = save_pretrain_ckpt(tmp_path, tok, "model.n_layer=2", "model.d_model=64")
    module = make_module(tmp_path, tok)
    with pytest.raises(CheckpointError, match=r"different model shape(.|\n)*model\.n_layer: checkpoint 2 vs config 4"):
        module.init_backbone_from(str(path))


def test_init_from_a_reward_checkpoint_is_refused(tmp_path, tok):
    module = make_module(tmp_path, tok)
    path = tmp_path / "rm.ckpt"
    torch.save({"state_dict": module.state_dict(), "lmforge": module.checkpoint_metadata()}, path)
    with pytest.raises(CheckpointError, match="'reward' checkpoint"):
        make_module(tmp_path, tok).init_backbone_from(str(path))


# ------------------------------------------------------------- a short real run


def test_short_run_stores_reward_stats_from_the_final_step_in_last_ckpt(tmp_path, tok, shared_cache, monkeypatch):
    init = save_pretrain_ckpt(tmp_path, tok)
    # A val/loss that never improves: ModelCheckpoint(monitor=val/loss, save_last=True) then
    # writes last.ckpt at the first validation only; the stage must still leave the final one.
    log_stats = RewardModule._log_pair_stats
    monkeypatch.setattr(
        RewardModule,
        "_log_pair_stats",
        lambda self, split, loss, stats, n: log_stats(
            self, split, torch.ones(()) if split == "val" else loss, stats, n
        ),
    )
    # 5 steps, validating every 4: the final step (5) must still validate and be in last.ckpt.
    cfg = compose_config(
        [
            *SMOKE,
            f"init_from={init}",
            "trainer.max_steps=5",
            "trainer.eval_every=4",
            "algo.batch_size=4",
            "algo.val_batches=2",
            "data.n_pairs=64",
            "data.n_eval=16",
            f"data.cache_dir={shared_cache}",
        ],
        run_dir=tmp_path / "run",
    )
    result = main(cfg)
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt.stage == "reward" and ckpt.raw["global_step"] == 5
    stats = ckpt.meta["reward_stats"]
    assert stats["n"] == 16 and stats["std"] > 0 and math.isfinite(stats["mean"])
    # the stats describe the saved weights: recompute them from the checkpoint
    module = RewardModule(cfg, tok)
    module.load_state_dict(ckpt.state_dict)
    module.eval()
    from lmforge.data.preference_data import PreferenceBatching, load_preference_splits

    splits = load_preference_splits(cfg.data, PreferenceBatching(4, cfg.algo.seq_len, 2, cfg.seed), tok)
    with torch.no_grad():
        r = module(**collate_pairs(splits.val, tok.pad_id))
    assert stats["mean"] == pytest.approx(float(r.mean()), abs=1e-4)
    assert stats["std"] == pytest.approx(float(r.std(unbiased=False)), abs=1e-4)
    assert 0.0 <= result["metrics"]["val/judge_agreement"] <= 1.0
    assert 0.0 <= result["metrics"]["val/judge_agreement_seen"] <= 1.0
    assert {"val/loss", "val/accuracy", "val/margin", "val/reward_mean", "val/reward_std"} <= set(result["metrics"])


@pytest.mark.slow
def test_pretrain_then_reward_end_to_end(tmp_path, shared_cache):
    env = {**os.environ, "WANDB_MODE": "offline"}
    common = ["experiment=smoke", "logger=csv", "trainer.progress_bar=none", f"data.cache_dir={shared_cache}"]

    def train(*overrides):
        proc = subprocess.run(
            train_py_cmd(*common, *overrides), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    train(f"hydra.run.dir={tmp_path / 'pre'}")
    pre = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    # 15 steps with eval_every=10: the final step is not a validation step of the schedule.
    train(
        "algo=reward",
        f"init_from={pre}",
        "data.n_pairs=2000",
        "trainer.max_steps=15",
        f"hydra.run.dir={tmp_path / 'rm'}",
    )
    ckpt = load_checkpoint(tmp_path / "rm" / "checkpoints" / "last.ckpt")
    assert ckpt.stage == "reward" and ckpt.raw["global_step"] == 15
    assert ckpt.meta["lineage"]["init_from"] == str(pre)
    assert set(ckpt.meta["reward_stats"]) == {"mean", "std", "n"}
    assert ckpt.tokenizer.proto() == load_checkpoint(pre).tokenizer.proto()
    header = (tmp_path / "rm" / "csv" / "metrics.csv").read_text().splitlines()[0]
    for key in (
        "train/loss",
        "train/accuracy",
        "val/accuracy",
        "val/judge_agreement",
        "val/judge_agreement_seen",
        "data/train_pairs",
    ):
        assert key in header


def test_judge_agreement_counts_the_pairs_the_judge_orders_the_same_way(tmp_path, tok):
    from lmforge.data.preference_data import encode_preferences
    from lmforge.data.preference_records import PreferencePair
    from lmforge.data.templates import BadRecords

    module = make_module(tmp_path, tok)
    # Rewards by response text: the judge's verdicts below agree with them on 3 of 4 pairs,
    # and the pair with a tie in the judge's scores is left out.
    reward_of = {" 4": 2.0, " 5": -1.0, " IV": 0.5, " four": 1.0, " 9": 0.0}
    pairs = [
        PreferencePair("What is 2 + 2?", " 4", " 5", "t:0", kind="add", chosen_score=1.0, rejected_score=0.2),
        PreferencePair("What is 2 + 2?", " 5", " 4", "t:1", kind="add", chosen_score=0.2, rejected_score=1.0),
        PreferencePair("What is 2 + 2?", " IV", " four", "t:2", kind="add", chosen_score=0.6, rejected_score=0.4),
        PreferencePair("What is 2 + 2?", " 4", " 9", "t:3", kind="mul", chosen_score=1.0, rejected_score=0.0),
        PreferencePair("What is 2 + 2?", " 5", " 9", "t:4", kind="mul", chosen_score=0.3, rejected_score=0.3),
    ]
    encoded, _, _ = encode_preferences(tok, pairs, 32, BadRecords("error"), "judge pairs")
    module.set_judge_pairs(encoded, pairs, batch_size=2, name="seen")
    module.set_judge_pairs(encoded, pairs, batch_size=3)
    assert len(module.judge_sets["seen"].sign) == 4  # the tie is dropped

    lookup = {tuple(e.chosen): reward_of[p.chosen] for e, p in zip(encoded, pairs)}
    lookup |= {tuple(e.rejected): reward_of[p.rejected] for e, p in zip(encoded, pairs)}

    def fake_forward(input_ids, attention_mask):
        return torch.tensor([lookup[tuple(row[m].tolist())] for row, m in zip(input_ids, attention_mask.bool())])

    module.forward = fake_forward
    logged = {}
    module.log = lambda key, value, **kw: logged.__setitem__(key, float(value))
    module.log_judge_agreement("seen")
    module.log_judge_agreement()
    assert logged == {
        "val/judge_agreement_seen": 0.75,
        "val/judge_agreement": 0.75,
        "val/judge_agreement_add": pytest.approx(2 / 3),
        "val/judge_agreement_mul": 1.0,
    }
