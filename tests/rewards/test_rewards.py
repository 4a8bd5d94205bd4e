"""Reward sources: callables by _target_, reward-model checkpoints normalized by their stored
statistics, weighted sums, and clear refusals of configurations that cannot work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algos"))  # the shared RL helpers

from test_rollout import (
    build_rl_assets,
    make_reward_checkpoint,
    nano_config,
    save_stage_checkpoint,
)

from lmforge.model import CausalLM, ScalarModel, gather_last
from lmforge.rewards.reward_function import build_reward
from lmforge.rewards.reward_model import RewardModelSource, normalized_head
from lmforge.rewards.source import RewardConfigError, ScoringBatch
from lmforge.training.checkpoint import CheckpointError, load_checkpoint
from lmforge.world.judge import judge_batch


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


PROMPTS = [
    "User: What is 7 + 12?\nAssistant:",
    "User: Uppercase: lemon\nAssistant:",
    "User: What comes after 3?\nAssistant:",
]
RESPONSES = [" 19", " lemon", " I think it is 4, or maybe 5."]


def length_reward(prompts, responses, per_char=1.0):
    """A reward callable with a parameter, importable as test_rewards.length_reward."""
    return [per_char * len(r) for r in responses]


def batch_of(prompts=PROMPTS, responses=RESPONSES) -> ScoringBatch:
    return ScoringBatch(prompts=list(prompts), responses=list(responses))


def test_a_callable_named_by_target_scores_text():
    reward = build_reward({"sources": [{"_target_": "lmforge.world.judge.ground_truth_reward"}]})
    total, parts = reward(batch_of())
    assert total.tolist() == pytest.approx(judge_batch(PROMPTS, RESPONSES))
    assert list(parts) == ["ground_truth_reward"]
    # A class is instantiated, a function gets its args bound.
    cls = build_reward({"sources": [{"_target_": "lmforge.world.judge.GroundTruthReward", "name": "gt"}]})
    assert cls(batch_of())[0].tolist() == total.tolist()
    scaled = build_reward({"sources": [{"_target_": "test_rewards.length_reward", "args": {"per_char": 0.5}}]})
    assert scaled(batch_of())[0].tolist() == [0.5 * len(r) for r in RESPONSES]


def rm_raw_scores(path: Path, tokenizer, prompts, responses) -> torch.Tensor:
    """The reward model's score read independently: prompt + response + EOS, one at a time."""
    ckpt = load_checkpoint(path)
    rm = ScalarModel(ckpt.model_config)
    rm.load_state_dict({k[len("model.") :]: v for k, v in ckpt.state_dict.items()})
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([tokenizer.encode(p) + tokenizer.encode(r) + [tokenizer.eos_id]])
            out.append(float(rm(ids)[0, -1]))
    return torch.tensor(out)


def test_reward_model_scores_are_normalized_with_its_stored_stats(rl_assets, tmp_path):
    tok = rl_assets["tokenizer"]
    path = make_reward_checkpoint(tmp_path / "rm.ckpt", tok, mean=0.5, std=2.0, head_bias=3.0)
    raw = rm_raw_scores(path, tok, PROMPTS, RESPONSES)
    source = RewardModelSource(path, tokenizer=tok)
    torch.testing.assert_close(source(batch_of()), (raw - 0.5) / 2.0, atol=1e-5, rtol=0)
    unnormalized = build_reward({"sources": [{"ckpt": str(path), "normalize": False}]})
    torch.testing.assert_close(unnormalized(batch_of())[0], raw, atol=1e-5, rtol=0)
    # A critic initialized from it predicts the normalized reward: the head with the stats folded in.
    w, b = normalized_head(source)
    hidden = torch.randn(2, source.model.cfg.d_model)
    torch.testing.assert_close(hidden @ w.T + b, (source.model.head(hidden) - 0.5) / 2.0, atol=1e-5, rtol=1e-5)


def test_reward_model_reads_the_policy_tokens_left_padded_like_the_text(rl_assets):
    """Scoring the rollout's own (left-padded) tokens gives the same reward as re-encoding the text."""
    tok = rl_assets["tokenizer"]
    source = RewardModelSource(rl_assets["reward"], tokenizer=tok)
    assert source.reads_policy_tokens
    rows = [tok.encode(p) + tok.encode(r) + [tok.eos_id] for p, r in zip(PROMPTS, RESPONSES)]
    width = max(len(r) for r in rows)
    seq = torch.full((len(rows), width), tok.pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        seq[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = True
    from_tokens = source(ScoringBatch(PROMPTS, RESPONSES, sequences=seq, attention_mask=mask, tokenizer=tok))
    from_text = source(batch_of())  # right-padded re-encoding
    torch.testing.assert_close(from_tokens, from_text, atol=1e-4, rtol=0)


def test_sources_combine_with_weights_and_report_each(rl_assets):
    reward = build_reward(
        {
            "model": str(rl_assets["reward"]),
            "sources": [
                {"_target_": "lmforge.world.judge.ground_truth_reward", "weight": 0.5, "name": "gt"},
                {"_target_": "test_rewards.length_reward", "weight": -0.1},
            ],
        },
        tokenizer=rl_assets["tokenizer"],
    )
    total, parts = reward(batch_of())
    assert list(parts) == ["rm", "gt", "length_reward"]
    torch.testing.assert_close(total, parts["rm"] + 0.5 * parts["gt"] - 0.1 * parts["length_reward"])
    assert [rm.path for rm in reward.reward_models] == [str(rl_assets["reward"])]


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({}, "no source"),
        ({"sources": [{"ckpt": "x.ckpt", "_target_": "a.b"}]}, "exactly one of"),
        ({"sources": [{"weight": 1.0}]}, "exactly one of"),
        ({"sources": [{"_target_": "lmforge.no_such_module.reward"}]}, "cannot import"),
        (
            {"sources": [{"_target_": "test_rewards.length_reward"}, {"_target_": "test_rewards.length_reward"}]},
            "unique",
        ),
    ],
)
def test_unusable_reward_configs_are_refused(cfg, message):
    with pytest.raises(RewardConfigError, match=message):
        build_reward(cfg)


def one_score(prompts, responses):
    return [1.0]


def texts(prompts, responses):
    return responses


@pytest.mark.parametrize(
    "target, message", [("test_rewards.one_score", "returned 1 scores for 3"), ("test_rewards.texts", "not numbers")]
)
def test_a_callable_must_return_one_number_per_response(target, message):
    reward = build_reward({"sources": [{"_target_": target}]})
    with pytest.raises(RewardConfigError, match=message):
        reward(batch_of())


def test_checkpoints_that_are_not_usable_reward_models_are_refused(rl_assets, tmp_path):
    tok = rl_assets["tokenizer"]
    mc = nano_config()
    # A language model is not a reward model.
    with pytest.raises(CheckpointError, match="'sft' checkpoint.*reward"):
        build_reward({"model": str(rl_assets["policy"])})
    # A reward model without stored stats cannot be normalized (unless asked not to).
    bare = save_stage_checkpoint(tmp_path / "bare.ckpt", "reward", ScalarModel(mc), tok, mc)
    with pytest.raises(CheckpointError, match="reward_stats"):
        build_reward({"model": str(bare)})
    build_reward({"sources": [{"ckpt": str(bare), "normalize": False}]})
    assert isinstance(CausalLM(mc), torch.nn.Module)


def test_gather_last_reads_the_eos_of_left_and_right_padded_rows():
    values = torch.arange(12.0).view(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert gather_last(values, mask).tolist() == [5.0, 8.0]


def test_a_reward_target_that_moved_still_resolves_with_a_warning(caplog):
    """Configs written before the package was reorganized name the judge by its old path."""
    from lmforge.rewards.source import RENAMED_TARGETS, resolve_callable

    for old, new in RENAMED_TARGETS.items():
        with caplog.at_level("WARNING"):
            fn = resolve_callable(old)
        assert fn is resolve_callable(new)
        assert f"moved to {new}" in caplog.text


def test_an_ensemble_of_reward_models_combines_conservatively(rl_assets, tmp_path):
    """ensemble=uwo: mean - lambda * std over the reward models (each normalized by its own
    statistics), one term; callables are still added with their weights."""
    tok = rl_assets["tokenizer"]
    paths = [make_reward_checkpoint(tmp_path / f"rm{k}.ckpt", tok, seed=k, head_bias=0.3 * k) for k in range(3)]
    cfg = {
        "sources": [{"ckpt": str(p)} for p in paths] + [{"_target_": "test_rewards.length_reward", "weight": -0.1}],
        "ensemble": "uwo",
        "ensemble_lambda": 0.5,
    }
    total, parts = build_reward(cfg, tokenizer=tok)(batch_of())
    members = torch.stack([parts[f"rm_{k}"] for k in (1, 2, 3)])
    mean, std = members.mean(0), members.std(0, correction=0)
    assert (std > 0).all()  # different models disagree, so the penalty is not vacuous
    torch.testing.assert_close(parts["ensemble"], mean - 0.5 * std)
    torch.testing.assert_close(parts["ensemble_std"], std)
    torch.testing.assert_close(total, mean - 0.5 * std - 0.1 * parts["length_reward"])
    worst, _ = build_reward({**cfg, "ensemble": "wco"}, tokenizer=tok)(batch_of())
    torch.testing.assert_close(worst, members.min(0).values - 0.1 * parts["length_reward"])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"ensemble": "median"}, "use sum, mean, uwo, wco"),
        ({"ensemble": "uwo", "ensemble_lambda": -1.0}, "must be a number >= 0"),
        ({"ensemble": "uwo", "weights": [1.0, 0.5]}, "leave their weight at 1"),
        ({"ensemble": "uwo", "one": True}, "at least two reward models"),
    ],
)
def test_unusable_ensembles_are_refused(rl_assets, extra, message):
    extra = dict(extra)
    weights = extra.pop("weights", [1.0, 1.0])
    sources = [{"ckpt": str(rl_assets["reward"]), "weight": w, "name": f"m{i}"} for i, w in enumerate(weights)]
    if extra.pop("one", False):
        sources = sources[:1]
    with pytest.raises(RewardConfigError, match=message):
        build_reward({"sources": sources, **extra}, tokenizer=rl_assets["tokenizer"])
