"""REINFORCE, RLOO and GRPO: each runs an update that moves the policy towards reward, through
the same rollouts as PPO; their specific settings are checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared RL helpers

from test_rollout import build_rl_assets, logprob_change, rl_config, toy_update

from lmforge.errors import ConfigError
from lmforge.run import main
from lmforge.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


ALGOS = ("reinforce", "rloo", "grpo")


@pytest.mark.parametrize("algo", ALGOS)
def test_one_iteration_raises_the_probability_of_rewarded_responses(algo, rl_assets, tmp_path):
    # 16 responses per iteration: 16 prompts x 1 (REINFORCE) or 4 prompts x 4 samples (RLOO, GRPO).
    k = 1 if algo == "reinforce" else 4
    _, _, module = toy_update(
        algo,
        rl_assets,
        tmp_path / "run",
        f"algo.rollout_batch_size={16 // k}",
        f"algo.samples_per_prompt={k}",
        "algo.minibatch_size=16",
        "algo.micro_batch_size=4",
    )
    up, down = logprob_change(module)
    assert up > 0.02 and down < -0.02, (up, down)
    assert not any(n.startswith(("critic", "value_head")) for n, _ in module.named_parameters()), "no critic"


@pytest.mark.parametrize("algo", ALGOS)
def test_each_runs_end_to_end_with_a_reward_model(algo, rl_assets, tmp_path):
    k = 1 if algo == "reinforce" else 2
    cfg = rl_config(
        algo,
        rl_assets,
        tmp_path / "run",
        f"algo.reward.model={rl_assets['reward']}",
        f"algo.samples_per_prompt={k}",
        f"algo.rollout_batch_size={4 // k}",
    )  # 4 rows
    result = main(cfg)
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt.stage == algo and ckpt.raw["global_step"] == 2
    assert {k.split(".")[0] for k in ckpt.state_dict} == {"model"}  # the policy only
    assert ckpt.meta["lineage"]["reward_model"] == str(rl_assets["reward"])
    assert "val/gt_score" in result["metrics"] and "val/kl" in result["metrics"]
    if algo == "reinforce":
        assert ckpt.raw["lmforge_rl"]["baseline"]["n_updates"] == 2  # the baseline's state is checkpointed


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_group_methods_need_several_samples_per_prompt(algo, rl_assets, tmp_path):
    from lmforge.algos.pg import build

    cfg = rl_config(
        algo,
        rl_assets,
        tmp_path / "run",
        "algo.samples_per_prompt=1",
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
    )
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        build(cfg, tmp_path / "run")


def test_grpo_keeps_the_kl_out_of_the_advantages(rl_assets, tmp_path):
    """GRPO's advantages are group-normalized scores only: identical scores in a group give 0
    whatever the KL; RLOO folds the KL into its sequence reward."""
    import torch

    from lmforge.algos.pg import GRPOModule, RLOOModule
    from lmforge.algos.rollout import Rollout

    def rollout():
        B, N = 4, 3
        ro = Rollout(
            prompts=[None] * B,
            sequences=torch.zeros(B, 5, dtype=torch.long),
            attention_mask=torch.ones(B, 5, dtype=torch.bool),
            prompt_len=2,
            response_mask=torch.ones(B, N, dtype=torch.bool),
            ended=torch.ones(B, dtype=torch.bool),
            responses=[""] * B,
        )
        ro.scores = torch.tensor([1.0, 1.0, 0.0, 2.0])
        ro.logprobs = torch.tensor([[-1.0] * N, [-3.0] * N, [-1.0] * N, [-1.0] * N])
        ro.ref_logprobs = torch.full((B, N), -2.0)
        return ro

    for cls, algo in ((GRPOModule, "grpo"), (RLOOModule, "rloo")):
        cfg = rl_config(
            algo,
            rl_assets,
            tmp_path / algo,
            "algo.samples_per_prompt=2",
            "algo.kl_coef=0.5",
            "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
        )
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.cfg = cfg
        from lmforge.rl import FixedKLController

        module.kl_ctl = FixedKLController(0.5)
        ro = rollout()
        module.compute_advantages(ro)
        if algo == "grpo":
            assert ro.advantages[:2].tolist() == [0.0, 0.0]  # same score, different KL: no signal
            assert ro.advantages[2] < 0 < ro.advantages[3]
        else:
            # seq KL (k1): row 0: +3, row 1: -3 -> rewards 1 - 1.5 = -0.5 and 1 + 1.5 = 2.5
            torch.testing.assert_close(ro.advantages[:2], torch.tensor([-3.0, 3.0]))


def grpo_rollout(scores: list[float]):
    import torch

    from lmforge.algos.rollout import Rollout

    B, N = len(scores), 3
    ro = Rollout(
        prompts=[None] * B,
        sequences=torch.zeros(B, 5, dtype=torch.long),
        attention_mask=torch.ones(B, 5, dtype=torch.bool),
        prompt_len=2,
        response_mask=torch.ones(B, N, dtype=torch.bool),
        ended=torch.ones(B, dtype=torch.bool),
        responses=[""] * B,
    )
    ro.scores = torch.tensor(scores)
    ro.logprobs = ro.ref_logprobs = torch.full((B, N), -1.0)
    return ro


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_module_advantages_hand_values(rl_assets, tmp_path, scale):
    """GRPOModule.compute_advantages: (r - mean) / (std + 1e-4) per group of 4 (unbiased std), or
    r - mean with scale_rewards=false (Dr. GRPO)."""
    import torch

    from lmforge.algos.pg import build

    cfg = rl_config(
        "grpo",
        rl_assets,
        tmp_path / "run",
        "algo.samples_per_prompt=4",
        "algo.rollout_batch_size=2",
        "algo.minibatch_size=8",
        f"algo.scale_rewards={str(scale).lower()}",
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
    )
    module, _ = build(cfg, tmp_path / "run")
    ro = grpo_rollout([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0])
    module.compute_advantages(ro)
    # group 1: mean 0.25, std 0.5; group 2: mean 1, std sqrt(4/3)
    s1, s2 = (0.5 + 1e-4, (4 / 3) ** 0.5 + 1e-4) if scale else (1.0, 1.0)
    expected = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 1 / s2, 1 / s2, -1 / s2, -1 / s2]
    torch.testing.assert_close(ro.advantages, torch.tensor(expected))


@pytest.mark.parametrize(
    "algo, overrides, message",
    [
        ("reinforce", ["algo.minibatch_size=2"], "algo.clip_eps=null is the plain .on-policy. policy gradient"),
        ("rloo", ["algo.ppo_epochs=2"], "set algo.minibatch_size=4 and algo.ppo_epochs=1"),
        ("grpo", ["algo.kl_estimator=k1"], "k3"),
        ("grpo", ["algo.top_p=0.9"], "algo.top_k=null and algo.top_p=null"),
        ("grpo", ["algo.loss_agg=seq-mean-token-sum-norm", "algo.loss_agg_const=0"], "algo.loss_agg_const=0"),
    ],
)
def test_unworkable_settings_are_refused_naming_the_key(algo, overrides, message, rl_assets, tmp_path):
    from lmforge.algos.pg import build

    k = 1 if algo == "reinforce" else 2
    cfg = rl_config(
        algo,
        rl_assets,
        tmp_path / "run",
        f"algo.samples_per_prompt={k}",
        f"algo.rollout_batch_size={4 // k}",
        "algo.minibatch_size=4",
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
        *overrides,
    )
    with pytest.raises(ConfigError, match=message):
        build(cfg, tmp_path / "run")


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_grpo_module_loss_uses_the_configured_kl_estimator(estimator, rl_assets, tmp_path):
    """GRPOModule.loss's KL term (logged train/kl) is algo.kl_estimator's, with the loss's aggregation:
    a reference 0.3 nats below the sampling policy on every token gives k2 = 0.045, k3 = 0.0408."""
    import math

    import torch

    from lmforge.algos.pg import build

    cfg = rl_config(
        "grpo",
        rl_assets,
        tmp_path / "run",
        "algo.samples_per_prompt=2",
        "algo.rollout_batch_size=2",
        f"algo.kl_estimator={estimator}",
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
    )
    module, dm = build(cfg, tmp_path / "run")
    ro, _ = module.make_rollout(dm.train_prompts[:2], step=0)
    module.compute_advantages(ro)
    mb = module.take(module.minibatch_fields(ro), torch.arange(ro.size), ro.prompt_len)
    mb["ref_logprobs"] = mb["old_logprobs"] - 0.3
    _, stats = module.loss(mb)
    expected = {"k2": 0.5 * 0.3**2, "k3": math.exp(-0.3) - 1 + 0.3}[estimator]  # every token, so every mean
    assert float(stats["kl"]) == pytest.approx(expected, rel=1e-4)
