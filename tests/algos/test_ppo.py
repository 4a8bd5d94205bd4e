"""PPO: an update moves the policy towards reward, runs are reproducible, the checkpoint is a
loadable policy, wrong inputs are refused with a message, and train.py algo=ppo runs end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared RL helpers

from conftest import ROOT, train_py_cmd
from test_rollout import build_rl_assets, logprob_change, make_reward_checkpoint, rl_config, toy_update

from lmforge.errors import ConfigError
from lmforge.model import CausalLM
from lmforge.run import main
from lmforge.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_matching,
    submodule_state,
)


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


VOLATILE = ("time/", "perf/")  # wall-clock measurements differ between identical runs


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_one_ppo_iteration_raises_the_probability_of_rewarded_responses(rl_assets, tmp_path):
    before, after, module = toy_update(
        "ppo",
        rl_assets,
        tmp_path / "run",
        "algo.critic=policy_head",
        "algo.rollout_batch_size=16",
        "algo.minibatch_size=8",
        "algo.micro_batch_size=4",
        "algo.ppo_epochs=4",
    )
    up, down = logprob_change(module)
    assert up > 0.05 and down < -0.05, (up, down)  # rewarded responses became likelier, the rest less so
    assert after > before, (before, after)  # and so did rewarded first tokens on other prompts
    assert module.value_head is not None and module.critic is None


def check_val_gt_score(cfg, result) -> None:
    """The final val/gt_score is the judge's mean score of the final policy's greedy answers to the
    held-out prompts, recomputed here from the saved checkpoint."""
    from lmforge.algos.ppo import build
    from lmforge.world.judge import judge_batch

    module, _ = build(cfg, Path(cfg.run_dir))
    load_matching(
        module.model, submodule_state(load_checkpoint(result["last_checkpoint"]).state_dict, "model"), "last.ckpt"
    )
    module.model.eval()
    sums, examples = module.evaluate_prompts(module.eval_prompts)
    assert len(examples) == len(module.eval_prompts) == cfg.algo.eval_prompts
    gt = judge_batch([p.raw for p in module.eval_prompts], [e["sample"] for e in examples])
    assert result["metrics"]["val/gt_score"] == pytest.approx(sum(gt) / len(gt), abs=1e-6)


def test_ppo_with_a_reward_model_critic_is_deterministic(rl_assets, tmp_path):
    def run(name: str) -> list[dict]:
        cfg = rl_config(
            "ppo",
            rl_assets,
            tmp_path / name,
            "logger=csv",
            f"algo.reward.model={rl_assets['reward']}",
            "algo.adaptive_kl=true",
            "algo.kl_target=0.01",
            "algo.kl_horizon=100",
        )
        result = main(cfg)
        check_val_gt_score(cfg, result)
        return read_metrics(Path(cfg.run_dir))

    a, b = run("a"), run("b")
    keys = [k for k in a[0] if not k.startswith(VOLATILE)]
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    logged = {k for r in a for k, v in r.items() if v}
    for k in (
        "rollout/reward_mean",
        "rollout/reward_std",
        "rollout/gt_score",
        "rollout/kl",
        "rollout/entropy",
        "rollout/response_len",
        "rollout/eos_frac",
        "rollout/reward/rm",
        "train/clip_frac",
        "train/approx_kl",
        "train/value_loss",
        "train/explained_var",
        "train/kl_coef",
        "time/generate_s",
        "time/score_s",
        "time/update_s",
        "val/gt_score",
        "val/kl",
        "val/reward",
    ):
        assert k in logged, k
    # The adaptive controller moved beta (target KL far below the measured one).
    betas = [float(r["train/kl_coef"]) for r in a if r.get("train/kl_coef")]
    assert betas[-1] != 0.05, betas
    # Held-out metrics of the initial policy are logged at step 0.
    assert any(r["step"] == "0" and r.get("val/gt_score") for r in a)


def test_ppo_checkpoint_is_a_loadable_policy_with_lineage(rl_assets, tmp_path):
    cfg = rl_config("ppo", rl_assets, tmp_path / "run", f"algo.reward.model={rl_assets['reward']}")
    result = main(cfg)
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt.stage == "ppo" and ckpt.raw["global_step"] == 2  # trainer steps = RL iterations
    policy = CausalLM(ckpt.model_config)
    load_matching(policy, submodule_state(ckpt.state_dict, "model"), "ppo checkpoint")  # strict
    assert any(k.startswith("critic.") for k in ckpt.state_dict)
    assert not any(k.startswith(("ref_model.", "reward")) for k in ckpt.state_dict), "frozen models stay out"
    lineage = ckpt.meta["lineage"]
    assert lineage["init_from"] == str(rl_assets["policy"])
    assert lineage["reward_model"] == lineage["critic_from"] == str(rl_assets["reward"])
    assert Path(result["best_checkpoint"]).name == "best.ckpt"
    # The policy trained: it differs from the SFT weights it started from.
    sft = load_checkpoint(rl_assets["policy"]).state_dict
    changed = [k for k, v in ckpt.state_dict.items() if k in sft and not torch.equal(v, sft[k])]
    assert changed, "PPO updates must change the policy"
    # An RL checkpoint can start another RL run (e.g. a second PPO round).
    main(
        rl_config(
            "ppo",
            rl_assets,
            tmp_path / "again",
            f"init_from={result['last_checkpoint']}",
            "algo.critic=policy_head",
            "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
            "trainer.max_steps=1",
            "trainer.eval_every=100",
            "algo.eval_at_start=false",
        )
    )


def ppo_module(rl_assets, run_dir, *overrides):
    from lmforge.algos.ppo import build

    cfg = rl_config("ppo", rl_assets, run_dir, *overrides)
    return build(cfg, run_dir)[0]


def test_gae_through_the_module_uses_gamma_and_lambda_as_configured(rl_assets, tmp_path):
    """PPOModule.compute_advantages on a hand-made rollout (one response of 3 tokens, no KL):
    gamma=0.9, lam=0.5 give the hand-computed GAE; swapped they would not."""
    from lmforge.algos.rollout import Rollout

    module = ppo_module(
        rl_assets,
        tmp_path / "run",
        "algo.critic=policy_head",
        "algo.gamma=0.9",
        "algo.lam=0.5",
        "algo.whiten_advantages=false",
        "algo.kl_coef=0.5",
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
    )
    ro = Rollout(
        prompts=[None],
        sequences=torch.zeros(1, 5, dtype=torch.long),
        attention_mask=torch.ones(1, 5, dtype=torch.bool),
        prompt_len=2,
        response_mask=torch.ones(1, 3, dtype=torch.bool),
        ended=torch.ones(1, dtype=torch.bool),
        responses=[""],
    )
    ro.scores = torch.tensor([1.0])
    ro.logprobs = ro.ref_logprobs = torch.full((1, 3), -1.0)
    ro.values = torch.tensor([[0.5, 0.2, 0.4]])
    module.compute_advantages(ro)
    # rewards (0, 0, 1); deltas: 1 - 0.4 = 0.6, 0.9 * 0.4 - 0.2 = 0.16, 0.9 * 0.2 - 0.5 = -0.32;
    # A_t = delta_t + 0.9 * 0.5 * A_{t+1}
    a2 = 0.6
    a1 = 0.16 + 0.45 * a2
    a0 = -0.32 + 0.45 * a1
    torch.testing.assert_close(ro.advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ro.returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4]]))
    # The KL penalty enters every token's reward (k1 here: logp - ref = +0.2 on the first token).
    ro.logprobs = torch.tensor([[-0.8, -1.0, -1.0]])
    module.compute_advantages(ro)
    torch.testing.assert_close(ro.advantages[0, 0], torch.tensor(a0 - 0.5 * 0.2))


@pytest.mark.parametrize("critic_from", ["source", "other"])
def test_a_reward_model_critic_starts_by_predicting_the_normalized_reward(rl_assets, tmp_path, critic_from):
    """The critic's init folds the reward normalization into its head (rewards.normalized_head): its
    value of any sequence is (raw reward - mean) / std of the reward model it comes from."""
    from lmforge.rewards.reward_model import RewardModelSource

    rm_path = make_reward_checkpoint(tmp_path / "rm.ckpt", rl_assets["tokenizer"], mean=0.5, std=2.0, head_bias=3.0)
    if critic_from == "source":
        overrides = [f"algo.reward.model={rm_path}"]
    else:  # a reward checkpoint that is not among the reward sources: normalized by its own stats
        overrides = [
            "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
            f"algo.critic_from={rm_path}",
        ]
    from lmforge.algos.ppo import build

    cfg = rl_config("ppo", rl_assets, tmp_path / "run", *overrides)
    module = build(cfg, tmp_path / "run")[0]
    raw = RewardModelSource(rm_path, normalize=False).model
    x = torch.randint(3, cfg.model.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.critic(x), (raw(x) - 0.5) / 2.0, atol=1e-5, rtol=1e-5)
    assert module.critic.head.weight.requires_grad  # trained, unlike the reward model


def test_reward_stats_measured_on_the_initial_policys_samples(rl_assets, tmp_path):
    """algo.reward_stats_from=policy: the reward model is normalized by the mean and std of its raw
    scores of the initial policy's responses (not the stored 0.5 / 2.0), and the critic's head
    folds in those statistics."""
    from lmforge.algos.ppo import build
    from lmforge.algos.rollout import sample_rollout, scoring_batch, seed_for
    from lmforge.rewards.reward_model import RewardModelSource

    rm_path = make_reward_checkpoint(tmp_path / "rm.ckpt", rl_assets["tokenizer"], mean=0.5, std=2.0, head_bias=3.0)
    cfg = rl_config(
        "ppo",
        rl_assets,
        tmp_path / "run",
        f"algo.reward.model={rm_path}",
        "algo.reward_stats_from=policy",
        "algo.reward_stats_prompts=8",
        "algo.temperature=0.8",
        "algo.eval_batch_size=8",
    )  # one batch of samples
    module, dm = build(cfg, tmp_path / "run")
    rm = module.reward.reward_models[0]
    # The same samples again: 8 prompts, one response each, the documented seed and temperature.
    with torch.no_grad():
        ro = sample_rollout(
            module.model,
            dm.train_prompts[:8],
            module.tokenizer,
            max_new_tokens=cfg.algo.max_new_tokens,
            temperature=0.8,
            generator=torch.Generator().manual_seed(seed_for(cfg.seed, "reward-stats", 0, 0)),
        )
        raw = RewardModelSource(rm_path, tokenizer=module.tokenizer, normalize=False).raw_scores(
            scoring_batch(ro, module.tokenizer)
        )
    assert (rm.mean, rm.std) == (
        pytest.approx(float(raw.mean()), abs=1e-5),
        pytest.approx(float(raw.std(unbiased=False)), rel=1e-4),
    )
    assert abs(rm.mean - 0.5) > 1e-3 and abs(rm.std - 2.0) > 1e-3
    normalized = rm(scoring_batch(ro, module.tokenizer))
    assert float(normalized.mean()) == pytest.approx(0.0, abs=1e-4)
    x = torch.randint(3, cfg.model.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.critic(x), (rm.model(x) - rm.mean) / rm.std, atol=1e-5, rtol=1e-5)


class FakeTrainer:
    """What the held-out evaluation reads of a trainer; with `other` (a second rank's sums, in
    order), reduce adds that rank's value, as an all-reduce over two ranks would."""

    def __init__(self, other: list | None = None):
        self.world_size, self.global_rank, self.global_step = (2 if other else 1), 0, 0
        self.sanity_checking, self.loggers, self.strategy = False, [], self
        self.other = list(other or [])

    def reduce(self, value, reduce_op):
        assert reduce_op == "sum"
        return value + self.other.pop(0)


def test_held_out_metrics_per_kind_summed_over_ranks_and_on_the_hard_split(rl_assets, tmp_path):
    from lmforge.algos.ppo import build
    from lmforge.algos.rl_config import check_rl_config
    from lmforge.world.splits import split_of
    from lmforge.world.tasks import parse_task

    overrides = ("algo.eval_prompts=12", "algo.eval_batch_size=12", "algo.eval_hard_prompts=5")
    cfg = rl_config("ppo", rl_assets, tmp_path / "run", f"algo.reward.model={rl_assets['reward']}", *overrides)
    module, _ = build(cfg, tmp_path / "run")
    prompts = module.eval_prompts
    assert len(module.eval_hard_prompts) == 5 and {split_of(p.raw) for p in module.eval_hard_prompts} == {"hard"}
    # Two ranks, each evaluating half the prompts: the same keys in the same order on both,
    # whatever kinds each half holds, so the reduction pairs them up.
    a, _ = module.evaluate_prompts(prompts[0::2])
    b, _ = module.evaluate_prompts(prompts[1::2])
    assert list(a) == list(b)
    summed = module.eval_metrics({k: a[k] + b[k] for k in a})
    module._trainer = FakeTrainer(other=list(b.values()))
    assert module.eval_metrics(a) == pytest.approx(summed)
    module._trainer = None
    kinds = {parse_task(p.raw).kind for p in prompts}
    assert {k for k in summed if k.startswith("val/gt_score/")} == {f"val/gt_score/{k}" for k in kinds}
    count = {k: sum(parse_task(p.raw).kind == k for p in prompts) for k in kinds}
    for stat in ("gt_score", "exact"):
        total = sum(summed[f"val/{stat}/{k}"] * n for k, n in count.items())
        assert total / len(prompts) == pytest.approx(summed[f"val/{stat}"])
    # A validation logs val/* per kind and val_hard/* (the hard split's prompts, apart).
    logged: dict[str, float] = {}
    module.log = lambda key, value, **kw: logged.__setitem__(key, value)
    module._trainer = FakeTrainer()
    module.on_validation_epoch_start()
    module.validation_step(prompts, 0)
    module.on_validation_epoch_end()
    module._trainer = None
    hard_kinds = {parse_task(p.raw).kind for p in module.eval_hard_prompts}
    assert {"val/gt_score", "val_hard/gt_score", "val_hard/exact", "val_hard/kl"} <= set(logged)
    assert {f"val/gt_score/{k}" for k in kinds} <= set(logged)
    assert {k for k in logged if k.startswith("val_hard/gt_score/")} == {f"val_hard/gt_score/{k}" for k in hard_kinds}
    assert hard_kinds <= {"add", "sub", "mul", "compare", "next"}
    cfg.data.source = "jsonl"  # the hard split is the synthetic world's
    with pytest.raises(ConfigError, match="algo.eval_hard_prompts=5"):
        check_rl_config(cfg)


def test_a_reward_checkpoint_as_policy_is_refused_with_an_explanation(rl_assets, tmp_path):
    from lmforge.algos.ppo import build

    cfg = rl_config(
        "ppo",
        rl_assets,
        tmp_path / "run",
        f"init_from={rl_assets['reward']}",
        f"algo.reward.model={rl_assets['reward']}",
    )
    with pytest.raises(CheckpointError, match="'reward' checkpoint.*scalar head.*SFT"):
        build(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
        (["algo.minibatch_size=3"], "multiple of algo.minibatch_size"),
        (["algo.temperature=0"], "temperature"),
        (["algo.top_k=5"], "algo.top_k=null and algo.top_p=null"),
        (["algo.top_p=0.9"], "algo.top_k=null and algo.top_p=null"),
        (["algo.loss_agg=mean"], "algo.loss_agg='mean'"),
        (
            ["algo.critic=reward_model", "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]"],
            "critic_from",
        ),
        (["init_from=null"], "init_from"),
    ],
)
def test_unworkable_settings_are_refused_naming_the_key(rl_assets, tmp_path, overrides, message):
    from lmforge.algos.ppo import build

    cfg = rl_config("ppo", rl_assets, tmp_path / "run", f"algo.reward.model={rl_assets['reward']}", *overrides)
    if "init_from=null" not in overrides and "algo.critic=reward_model" in overrides:
        cfg.algo.reward.model = None
    with pytest.raises(ConfigError, match=message):
        build(cfg, tmp_path / "run")


@pytest.mark.slow
def test_train_py_algo_ppo_end_to_end_and_resume(rl_assets, tmp_path):
    run_dir = tmp_path / "ppo"
    common = [
        "algo=ppo",
        "model=nano",
        "logger=csv",
        "trainer.progress_bar=plain",
        f"init_from={rl_assets['policy']}",
        f"algo.reward.model={rl_assets['reward']}",
        "data.n_docs=2000",
        f"data.cache_dir={rl_assets['cache']}",
        "trainer.eval_every=2",
        "trainer.log_every=1",
        "algo.rollout_batch_size=8",
        "algo.minibatch_size=4",
        "algo.micro_batch_size=2",
        "algo.ppo_epochs=2",
        "algo.max_new_tokens=6",
        "algo.eval_max_new_tokens=6",
        "algo.eval_prompts=8",
        "algo.ptx_coef=0.1",
        "algo.ptx_batch_size=4",
        "algo.ptx_seq_len=48",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}

    def train_py(*extra):
        proc = subprocess.run(
            train_py_cmd(*common, *extra), cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    out = train_py("trainer.max_steps=2")
    assert "checkpoint:" in out and "val/gt_score" in out
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt").raw["global_step"] == 2
    train_py("trainer.max_steps=4", "resume=auto")
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt").raw["global_step"] == 4
    rows = read_metrics(run_dir)
    assert any(r.get("train/ptx_loss") for r in rows)
    assert (run_dir / "rollouts.jsonl").is_file() and (run_dir / "eval_samples.jsonl").is_file()
    steps = [int(r["step"]) for r in rows if r.get("rollout/reward_mean")]
    assert steps == sorted(set(steps)) and len(steps) == 4, steps
