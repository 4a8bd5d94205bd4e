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
from test_rollout import build_rl_assets, logprob_change, rl_config, toy_update

from lmforge.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_matching,
    submodule_state,
)
from lmforge.config import ConfigError
from lmforge.model import CausalLM
from lmforge.run import main


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


VOLATILE = ("time/", "perf/")  # wall-clock measurements differ between identical runs


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_one_ppo_iteration_raises_the_probability_of_rewarded_responses(rl_assets, tmp_path):
    before, after, module = toy_update("ppo", rl_assets, tmp_path / "run", "algo.critic=policy_head",
                                       "algo.rollout_batch_size=16", "algo.minibatch_size=8",
                                       "algo.micro_batch_size=4", "algo.ppo_epochs=4")
    up, down = logprob_change(module)
    assert up > 0.05 and down < -0.05, (up, down)  # rewarded responses became likelier, the rest less so
    assert after > before, (before, after)  # and so did rewarded first tokens on other prompts
    assert module.value_head is not None and module.critic is None


def test_ppo_with_a_reward_model_critic_is_deterministic(rl_assets, tmp_path):
    def run(name: str) -> list[dict]:
        cfg = rl_config("ppo", rl_assets, tmp_path / name, "logger=csv", f"algo.reward.model={rl_assets['reward']}",
                        "algo.adaptive_kl=true", "algo.kl_target=0.01", "algo.kl_horizon=100")
        result = main(cfg)
        assert result["metrics"]["val/gt_score"] >= 0
        return read_metrics(Path(cfg.run_dir))

    a, b = run("a"), run("b")
    keys = [k for k in a[0] if not k.startswith(VOLATILE)]
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    logged = {k for r in a for k, v in r.items() if v}
    for k in ("rollout/reward_mean", "rollout/reward_std", "rollout/gt_score", "rollout/kl", "rollout/entropy",
              "rollout/response_len", "rollout/eos_frac", "rollout/reward/rm", "train/clip_frac",
              "train/approx_kl", "train/value_loss", "train/explained_var", "train/kl_coef", "time/generate_s",
              "time/score_s", "time/update_s", "val/gt_score", "val/kl", "val/reward"):
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
    main(rl_config("ppo", rl_assets, tmp_path / "again", f"init_from={result['last_checkpoint']}",
                   "algo.critic=policy_head", "algo.reward.sources=[{_target_:lmforge.data.synthetic.ground_truth_reward}]",
                   "trainer.max_steps=1", "trainer.eval_every=100", "algo.eval_at_start=false"))


def test_a_reward_checkpoint_as_policy_is_refused_with_an_explanation(rl_assets, tmp_path):
    from lmforge.algos.ppo import build

    cfg = rl_config("ppo", rl_assets, tmp_path / "run", f"init_from={rl_assets['reward']}",
                    f"algo.reward.model={rl_assets['reward']}")
    with pytest.raises(CheckpointError, match="'reward' checkpoint.*scalar head.*SFT"):
        build(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
        (["algo.minibatch_size=3"], "multiple of algo.minibatch_size"),
        (["algo.temperature=0"], "temperature"),
        (["algo.critic=reward_model", "algo.reward.sources=[{_target_:lmforge.data.synthetic.ground_truth_reward}]"],
         "critic_from"),
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
        "algo=ppo", "model=nano", "logger=csv", "trainer.progress_bar=plain", f"init_from={rl_assets['policy']}",
        f"algo.reward.model={rl_assets['reward']}", "data.n_docs=2000", f"data.cache_dir={rl_assets['cache']}",
        "trainer.eval_every=2", "trainer.log_every=1", "algo.rollout_batch_size=8", "algo.minibatch_size=4",
        "algo.micro_batch_size=2", "algo.ppo_epochs=2", "algo.max_new_tokens=6", "algo.eval_max_new_tokens=6",
        "algo.eval_prompts=8", "algo.ptx_coef=0.1", "algo.ptx_batch_size=4", "algo.ptx_seq_len=48",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}

    def train_py(*extra):
        proc = subprocess.run(train_py_cmd(*common, *extra), cwd=ROOT, env=env, check=False,
                              capture_output=True, text=True, timeout=600)
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
