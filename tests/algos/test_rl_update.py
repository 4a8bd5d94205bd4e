"""One RL update through the stage modules (PPOModule, PGModule): the gradient does not depend on
how the update is split into micro-batches, the log-probs are those of the sampling temperature,
and the KL figures use the configured estimator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared RL helpers

from test_rollout import build_rl_assets, cut_responses, make_policy_checkpoint, record_updates, toy_update

from lmforge.model import CausalLM
from lmforge.training.checkpoint import load_checkpoint, load_matching, submodule_state


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


ALGOS = ("ppo", "reinforce", "rloo", "grpo")
ROWS = 16
LENGTHS = [6, 1, 6, 1, 2, 5, 3, 4]  # unequal responses: micro-batches hold different token counts
TEMPERATURE = 0.7

_runs: dict = {}


def captured_update(algo: str, micro: int, assets: dict, tmp_path_factory, *extra: str) -> dict:
    """One iteration of `algo` (one optimizer update over all ROWS responses, at TEMPERATURE, with
    a KL term, unequal response lengths, no gradient clipping), micro-batches of `micro` rows:
    the gradient of the update, the stats of every micro-batch, the module (cached)."""
    key = (algo, micro, extra)
    if key not in _runs:
        k = 1 if algo in ("ppo", "reinforce") else 4
        grads, stats = [], []

        def prepare(module):
            cut_responses(module, LENGTHS)
            g, s = record_updates(module)
            grads.append(g), stats.append(s)

        per_algo = ["algo.critic=policy_head"] if algo == "ppo" else []
        _, _, module = toy_update(
            algo,
            assets,
            tmp_path_factory.mktemp(f"{algo}-{micro}"),
            f"algo.rollout_batch_size={ROWS // k}",
            f"algo.samples_per_prompt={k}",
            f"algo.minibatch_size={ROWS}",
            f"algo.micro_batch_size={micro}",
            "algo.ppo_epochs=1",
            "algo.max_new_tokens=6",
            f"algo.temperature={TEMPERATURE}",
            "algo.kl_coef=0.1",
            "algo.optim.grad_clip=0",
            *per_algo,
            *extra,
            prepare=prepare,
        )
        assert len(grads[0]) == 1, "one optimizer update"
        _runs[key] = {"grad": grads[0][0], "stats": stats[0], "module": module}
    return _runs[key]


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a) ** 0.5
    norm = sum(float(a[n].double().pow(2).sum()) for n in a) ** 0.5
    assert norm > 0, "the update must have a gradient"
    return diff / norm


DR_GRPO = ("algo.scale_rewards=false", "algo.loss_agg=seq-mean-token-sum-norm")


@pytest.mark.parametrize("algo, extra", [(a, ()) for a in ALGOS] + [("grpo", DR_GRPO)], ids=[*ALGOS, "dr-grpo"])
def test_the_gradient_of_an_update_does_not_depend_on_the_micro_batch_split(algo, extra, rl_assets, tmp_path_factory):
    whole = captured_update(algo, ROWS, rl_assets, tmp_path_factory, *extra)
    split = captured_update(algo, ROWS // 4, rl_assets, tmp_path_factory, *extra)
    ro_a, ro_b = whole["module"].last_rollout, split["module"].last_rollout
    assert torch.equal(ro_a.sequences, ro_b.sequences), "the same rollout"
    lengths = ro_a.lengths()
    assert lengths.max() > 2 * lengths.min(), lengths  # micro-batches of unequal token counts
    assert len(split["stats"]) == 4 and len(whole["stats"]) == 1
    assert relative_difference(whole["grad"], split["grad"]) < 1e-4
    # The logged loss is the update's: the micro-batches' shares add up to it.
    total = sum(s["policy_loss"] for s in split["stats"])
    assert total == pytest.approx(whole["stats"][0]["policy_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_new_log_probs_equal_the_old_ones_at_the_start_of_an_update(algo, rl_assets, tmp_path_factory):
    """At temperature 0.7, before the first step the policy is the one that sampled: every ratio is
    1 (the loss and the rollout apply the same temperature)."""
    run = captured_update(algo, ROWS // 4, rl_assets, tmp_path_factory)
    for s in run["stats"]:
        assert s["approx_kl"] < 1e-10, run["stats"]
        assert s.get("clip_frac", 0.0) == 0.0


def test_old_and_reference_log_probs_are_those_of_the_sampling_distribution(rl_assets, tmp_path_factory):
    """The rollout's log-probs (recomputed in one batch by the module) equal log softmax(logits / T)
    of the initial policy, token by token; the reference starts as the same policy."""
    run = captured_update("ppo", ROWS // 4, rl_assets, tmp_path_factory)
    ro = run["module"].last_rollout
    ckpt = load_checkpoint(rl_assets["policy"])
    policy = CausalLM(ckpt.model_config).eval()
    load_matching(policy, submodule_state(ckpt.state_dict, "model"), "policy")
    torch.testing.assert_close(ro.ref_logprobs, ro.logprobs, atol=1e-5, rtol=0)
    for row in range(4):
        ids = [
            t
            for t, a in zip(
                ro.sequences[row, : ro.prompt_len].tolist(), ro.attention_mask[row, : ro.prompt_len].tolist()
            )
            if a
        ]
        for t in range(int(ro.response_mask[row].sum())):
            tok = int(ro.response_tokens[row, t])
            with torch.no_grad():
                expected = F.log_softmax(policy(torch.tensor([ids]))[0, -1].float() / TEMPERATURE, -1)[tok]
            torch.testing.assert_close(ro.logprobs[row, t], expected, atol=2e-4, rtol=0)
            ids.append(tok)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_the_kl_controller_and_rollout_kl_use_the_configured_estimator(algo, rl_assets, tmp_path_factory):
    """With a reference that differs from the policy (k1 != k3), the adaptive controller reads the
    k3 estimate when kl_estimator=k3, and rollout/kl is that figure; k1 and k3 are logged by name."""
    ref = make_policy_checkpoint(tmp_path_factory.mktemp("ref") / "ref.ckpt", rl_assets["tokenizer"], seed=5)
    readings = []

    def prepare(module):
        update = module.kl_ctl.update

        def recorded(kl, n_steps):
            readings.append(float(kl))
            return update(kl, n_steps)

        module.kl_ctl.update = recorded

    k = 1 if algo == "ppo" else 4
    _, _, module = toy_update(
        algo,
        rl_assets,
        tmp_path_factory.mktemp(f"kl-{algo}"),
        f"algo.ref_from={ref}",
        "algo.kl_estimator=k3",
        "algo.adaptive_kl=true",
        "algo.kl_coef=0.1",
        f"algo.rollout_batch_size={8 // k}",
        f"algo.samples_per_prompt={k}",
        "algo.minibatch_size=8",
        "algo.micro_batch_size=4",
        "algo.critic=policy_head" if algo == "ppo" else "algo.scale_rewards=true",
        prepare=prepare,
    )
    metrics = module.trainer.callback_metrics
    kl, k1, k3 = (float(metrics[f"rollout/{n}"]) for n in ("kl", "kl_k1", "kl_k3"))
    assert abs(k1 - k3) > 0.1 * abs(k3), (k1, k3)  # the test can tell the estimators apart
    assert kl == pytest.approx(k3, rel=1e-5)
    assert readings == [pytest.approx(k3, rel=1e-5)]
    ro = module.last_rollout
    assert float(module.sequence_kl(ro).mean()) == pytest.approx(k3, rel=1e-5)
