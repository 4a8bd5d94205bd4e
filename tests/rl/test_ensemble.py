"""The conservative combination of a reward-model ensemble (lmforge.rl.ensemble), against values
computed by hand."""

import math

import pytest
import torch

from lmforge.rl.ensemble import ensemble_reward, ensemble_std

# 3 models x 2 responses. Response 0: the models agree (1, 1, 1); response 1: they disagree (0, 3, 6).
SCORES = torch.tensor([[1.0, 0.0], [1.0, 3.0], [1.0, 6.0]])


def test_mean_min_and_population_std_by_hand():
    torch.testing.assert_close(ensemble_reward(SCORES, "mean"), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(ensemble_reward(SCORES, "wco"), torch.tensor([1.0, 0.0]))
    # population std of (0, 3, 6): sqrt(((-3)^2 + 0 + 3^2) / 3) = sqrt(6)
    torch.testing.assert_close(ensemble_std(SCORES), torch.tensor([0.0, math.sqrt(6.0)]))


def test_uwo_subtracts_lambda_times_the_disagreement():
    # response 1: 3 - 0.5 * sqrt(6) = 1.7752551...; the agreed response keeps its reward
    torch.testing.assert_close(ensemble_reward(SCORES, "uwo", lam=0.5), torch.tensor([1.0, 3.0 - 0.5 * math.sqrt(6.0)]))
    torch.testing.assert_close(ensemble_reward(SCORES, "uwo", lam=0.0), ensemble_reward(SCORES, "mean"))
    # the conservative reward prefers the response the models agree on once lam > 2 / sqrt(6)
    r = ensemble_reward(SCORES, "uwo", lam=1.0)
    assert r[0] > r[1]


def test_one_model_has_no_penalty_and_bad_input_is_refused():
    one = torch.tensor([[0.3, -1.2]])
    torch.testing.assert_close(ensemble_reward(one, "uwo", lam=5.0), one[0])
    with pytest.raises(ValueError, match="unknown ensemble mode"):
        ensemble_reward(SCORES, "median")
    with pytest.raises(ValueError, match=r"\(K models, B responses\)"):
        ensemble_reward(torch.ones(3), "mean")
