"""DPO, conservative DPO, IPO and SimPO losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.rl import dpo_loss, ipo_loss, sequence_logprobs, simpo_loss

# Two pairs. beta = 0.5.
#   pair 1: log-ratios chosen +1, rejected -1 -> implicit rewards +0.5, -0.5, h = 1.0
#   pair 2: log-ratios chosen  0, rejected +1 -> implicit rewards  0.0, +0.5, h = -0.5
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_dpo_loss_and_stats_match_the_hand_computed_values():
    loss, stats = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    # -log sigmoid(1.0) = log(1 + e^-1) = 0.313262; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077
    assert float(loss) == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    assert float(stats["rewards_chosen"]) == pytest.approx((0.5 + 0.0) / 2)
    assert float(stats["rewards_rejected"]) == pytest.approx((-0.5 + 0.5) / 2)
    assert float(stats["reward_margin"]) == pytest.approx((1.0 - 0.5) / 2)
    assert float(stats["accuracy"]) == 0.5


def test_conservative_dpo_mixes_the_flipped_label_in():
    loss, _ = dpo_loss(PI_C[:1], PI_R[:1], REF_C[:1], REF_R[:1], beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.313262 + 0.1 * 1.313262
    assert float(loss) == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)


def test_dpo_gradient_is_beta_times_the_probability_of_the_wrong_order():
    pi_c = PI_C[:1].clone().requires_grad_(True)
    pi_r = PI_R[:1].clone().requires_grad_(True)
    loss, _ = dpo_loss(pi_c, pi_r, REF_C[:1], REF_R[:1], beta=0.5)
    loss.backward()
    # d/d pi_c of -log sigmoid(h), h = beta (pi_c - ref_c - pi_r + ref_r): -beta * sigmoid(-h)
    wrong = 1.0 / (1.0 + math.exp(1.0))  # sigmoid(-1) = 0.268941
    assert float(pi_c.grad) == pytest.approx(-0.5 * wrong, abs=1e-6)
    assert float(pi_r.grad) == pytest.approx(0.5 * wrong, abs=1e-6)


def test_dpo_starts_at_log_2_when_the_policy_is_the_reference():
    pi = torch.tensor([-4.0, -7.5, -1.25])
    for beta in (0.01, 0.1, 1.0):
        loss, stats = dpo_loss(pi, pi - 1.0, pi, pi - 1.0, beta=beta)
        assert float(loss) == pytest.approx(math.log(2.0), abs=1e-6)
        assert float(stats["reward_margin"]) == 0.0 and float(stats["accuracy"]) == 0.0  # ties count as wrong


def test_ipo_regresses_the_log_ratio_margin_onto_one_over_two_beta():
    loss, stats = ipo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    # target 1 / (2 * 0.5) = 1; h = 2 and -1: ((2 - 1)^2 + (-1 - 1)^2) / 2 = (1 + 4) / 2
    assert float(loss) == pytest.approx(2.5)
    assert float(stats["reward_margin"]) == pytest.approx((1.0 - 0.5) / 2)
    # at the target the loss is zero: IPO does not push the margin further (DPO would)
    at_target, _ = ipo_loss(torch.tensor([0.0]), torch.tensor([-4.0]), torch.tensor([0.0]), torch.tensor([-3.0]), 0.5)
    assert float(at_target) == 0.0
    dpo_there, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-4.0]), torch.tensor([0.0]), torch.tensor([-3.0]), 0.5)
    assert float(dpo_there) > 0.0


def test_simpo_uses_length_averaged_log_probs_a_margin_and_no_reference():
    loss, stats = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    # h = 2 * (-0.5 + 1.5) - 0.5 = 1.5: -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413
    assert float(loss) == pytest.approx(softplus(-1.5), abs=1e-6)
    assert float(loss) == pytest.approx(0.2014133, abs=1e-6)
    assert float(stats["rewards_chosen"]) == pytest.approx(-1.0)
    assert float(stats["rewards_rejected"]) == pytest.approx(-3.0)
    smoothed, _ = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), 2.0, 0.5, label_smoothing=0.2)
    assert float(smoothed) == pytest.approx(0.8 * softplus(-1.5) + 0.2 * softplus(1.5), abs=1e-6)


def test_sequence_logprobs_sums_real_tokens_only_even_with_inf_padding():
    token_logps = torch.tensor([[-1.0, -2.0, -float("inf")], [-0.5, -float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, n = sequence_logprobs(token_logps, mask)
    assert total.tolist() == [-3.0, -0.5] and n.tolist() == [2, 1]


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        (dpo_loss, {"beta": 0.0}),
        (dpo_loss, {"beta": 0.1, "label_smoothing": 0.5}),
        (ipo_loss, {"beta": -1.0}),
    ],
)
def test_bad_hyperparameters_are_refused(fn, kwargs):
    with pytest.raises(ValueError):
        fn(PI_C, PI_R, REF_C, REF_R, **kwargs)
