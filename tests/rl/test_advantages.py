import math

import pytest
import torch

from lmforge.rl.advantages import (
    MovingAverageBaseline,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    last_token_index,
    rloo_advantages,
    token_rewards,
)

MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)


def test_last_token_index():
    torch.testing.assert_close(last_token_index(MASK), torch.tensor([2, 1, 0]))


def test_token_rewards_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0], [-3.0, -3.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.0, 0.0], [0.0, 0.0, 0.0]])
    score = torch.tensor([2.0, -1.0, 7.0])
    rewards, kl = token_rewards(score, logp, ref, MASK, kl_coef=0.1)
    # k1 = logp - ref on real tokens, 0 on padding
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    expected = torch.tensor(
        [
            [-0.05, 0.1, 0.0 + 2.0],  # score on the last real token
            [0.05, 0.0 - 1.0, 0.0],  # nothing after the end
            [0.0, 0.0, 0.0],  # empty response: score dropped
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_token_rewards_k3_and_tensor_coef():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    rewards, kl = token_rewards(torch.tensor([1.0]), logp, ref, torch.ones(1, 1), torch.tensor(2.0), kl_kind="k3")
    k3 = 0.5 - 1 + math.log(2)
    assert kl.item() == pytest.approx(k3)
    assert rewards.item() == pytest.approx(1.0 - 2.0 * k3)


def test_gae_hand_computed():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.3, 0.7], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    # Row 0: delta_2 = 1.0 - 0.7 = 0.3 (next value 0 at the end)
    #        delta_1 = -0.2 + 0.9 * 0.7 - 0.3 = 0.13;  A_1 = 0.13 + 0.72 * 0.3 = 0.346
    #        delta_0 = 0.1 + 0.9 * 0.3 - 0.5 = -0.13;  A_0 = -0.13 + 0.72 * 0.346 = 0.11912
    # Row 1 (length 2; the 5.0 / 9.0 at t=2 are padding and must not leak):
    #        A_1 = 2.0 - 0.5 = 1.5;  A_0 = (0.9 * 0.5 - 1.0) + 0.72 * 1.5 = 0.53
    expected_adv = torch.tensor([[0.11912, 0.346, 0.3], [0.53, 1.5, 0.0]])
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, torch.tensor([[0.61912, 0.646, 1.0], [1.53, 2.0, 0.0]]))


def test_gae_lambda_one_gamma_one_is_monte_carlo_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 0.5, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 3.0, 3.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.0, 1.0, 2.5, 0.0]]))


def test_gae_detaches():
    values = torch.ones(1, 2, requires_grad=True)
    adv, ret = gae_advantages(torch.ones(1, 2), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


def test_discounted_returns():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = discounted_returns(rewards, mask, gamma=0.5)
    # row 0: G_2 = 2, G_1 = 0 + 0.5*2 = 1, G_0 = 1 + 0.5*1 = 1.5; row 1 ignores the padded 8
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0, 2.0], [1.5, 3.0, 0.0]]))


def test_rloo_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    # group 1: sum 12, A_i = r_i - (12 - r_i) / 3; group 2: sum 4
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0])
    torch.testing.assert_close(rloo_advantages(scores, k=4), expected)
    # equivalently k/(k-1) * (r - group mean)
    group_mean = scores.view(-1, 2).mean(1).repeat_interleave(2)
    torch.testing.assert_close(rloo_advantages(scores, k=2), 2 * (scores - group_mean))


def test_group_shape_checks():
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(5), k=2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), k=1)


def test_grpo_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = grpo_advantages(scores, k=4)
    # group 1: mean 3, deviations (-2, -1, 0, 3), unbiased var 14/3
    std = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    expected[:4] /= std + 1e-4
    torch.testing.assert_close(adv, expected)  # identical group -> 0, not nan
    torch.testing.assert_close(grpo_advantages(scores, k=4, scale=False), torch.tensor([-2.0, -1, 0, 3, 0, 0, 0, 0]))
    torch.testing.assert_close(grpo_advantages(scores, k=4, eps=0.5)[3], torch.tensor(3 / (std + 0.5)))


def test_moving_average_baseline():
    b = MovingAverageBaseline(momentum=0.9)
    assert b.value == 0.0
    assert b.update(2.0) == 2.0  # first update adopts the batch mean
    assert b.update(torch.tensor(4.0)) == pytest.approx(0.9 * 2 + 0.1 * 4)
    c = MovingAverageBaseline(momentum=0.9)
    c.load_state_dict(b.state_dict())
    assert c.value == b.value and c.n_updates == 2
    assert c.update(0.0) == pytest.approx(0.9 * 2.2)
    with pytest.raises(ValueError):
        MovingAverageBaseline(momentum=1.0)
