import math

import pytest
import torch

from lmforge.rl.losses import (
    LossNorm,
    aggregate,
    bradley_terry_loss,
    entropy_from_logits,
    grpo_loss,
    logprobs_from_logits,
    policy_gradient_loss,
    ppo_policy_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
    value_loss,
)

# ---------------------------------------------------------------- log-probs / entropy


def test_logprobs_hand_values():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]]])  # probs (1/4, 3/4), (1/2, 1/2)
    tokens = torch.tensor([[1, 0]])
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), torch.tensor([[math.log(0.75), math.log(0.5)]]))


def test_logprobs_float32_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    out = logprobs_from_logits(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, temperature=0.7), ref)


def test_logprobs_alignment_convention():
    # A "model" whose logits at position p put all mass on input_ids[p + 1].
    input_ids = torch.tensor([[5, 1, 4, 2, 3]])
    V, P = 6, 2  # response = input_ids[:, 2:]
    logits = torch.full((1, 5, V), -1e4)
    logits[0, torch.arange(4), input_ids[0, 1:]] = 0.0
    lp = logprobs_from_logits(logits[:, P - 1 : -1], input_ids[:, P:])
    torch.testing.assert_close(lp, torch.zeros(1, 3))


def test_entropy_hand_values_and_mask():
    V = 4
    logits = torch.zeros(1, 3, V)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), -1e9, -1e9])  # probs (1/4, 3/4, 0, 0)
    logits[0, 2] = 100.0 * torch.arange(V)  # padding, must be ignored
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits, mask).item() == pytest.approx((math.log(V) + h1) / 2, rel=1e-5)


def test_entropy_with_neg_inf_logits_is_finite_with_finite_grad():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(logits, torch.ones(1, 1))
    h.backward()
    assert h.item() == pytest.approx(math.log(2))
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- PPO


def ppo_case():
    # log-ratios: 0.5 (r=1.65, above 1.2), -0.5 (r=0.61, below 0.8), 0.1 (inside), -0.5, then padding
    old = torch.zeros(1, 5)
    logp = torch.tensor([[0.5, -0.5, 0.1, -0.5, 3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_ppo_policy_loss_hand_values():
    logp, old, adv, mask = ppo_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1), math.exp(-0.5)]
    per_token = [
        -1.0 * 1.2,  # A>0, r>1+eps: clipped branch (no further credit for raising it)
        -1.0 * r[1],  # A>0, r<1-eps: unclipped, pessimistic
        1.0 * r[2],  # inside the range
        2.0 * 0.8,  # A<0, r<1-eps: clipped branch
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.01 + 0.25) / 4, rel=1e-6)
    assert not stats["clip_frac"].requires_grad


def test_ppo_policy_gradient():
    logp, old, adv, mask = ppo_case()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    n = 4
    expected = torch.tensor([[0.0, -1.0 * math.exp(-0.5) / n, 1.0 * math.exp(0.1) / n, 0.0, 0.0]])
    # zero where clipped (ratio > 1+eps with A > 0, ratio < 1-eps with A < 0) and on padding;
    # -A * ratio / N inside the range
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_sequence_advantages_broadcast():
    logp, old, _, mask = ppo_case()
    adv_seq = torch.tensor([0.7])
    a, _ = ppo_policy_loss(logp, old, adv_seq, mask)
    b, _ = ppo_policy_loss(logp, old, adv_seq[:, None].expand(1, 5), mask)
    torch.testing.assert_close(a, b)


def test_value_loss_hand_values():
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.5, 1.1, 0.5, 7.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # t0: v err 0.25, clipped v=1.2 err 0.64 -> 0.64 (clipped wins)
    # t1: inside the clip, err 1.21
    # t2: v err 0.25, clipped v=0.8 err 0.64 -> 0.64 (clipped wins)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 0.64) / 3)
    assert stats["vf_clip_frac"].item() == pytest.approx(2 / 3)
    loss.backward()
    # gradient only through the unclipped token: 0.5 * 2 * (1.1 - 0) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1.1 / 3, 0.0, 0.0]]))
    unclipped, _ = value_loss(values, old, returns, mask, clip_eps=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 1.21 + 0.25) / 3)


# ---------------------------------------------------------------- REINFORCE / RLOO


def test_policy_gradient_loss():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0], requires_grad=True)
    loss = policy_gradient_loss(logp, adv, mask)
    assert loss.item() == pytest.approx(-(2 * -1 + 2 * -2 + -1 * -0.5 * 3) / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]))
    assert adv.grad is None  # advantages are constants


# ---------------------------------------------------------------- GRPO


def test_grpo_loss_sequence_then_batch_mean():
    # Ratio 1 and ref == policy: the loss is just -mean over sequences of A.
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -5.0, -5.0]], requires_grad=True)
    adv = torch.tensor([1.0, -3.0])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1.0 - 3.0) / 2)
    assert stats["kl"].item() == pytest.approx(0.0)
    loss.backward()
    # each sequence weighs 1/B, spread over its own L_b tokens: dL/dlogp = -A / (L_b * B)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1.5, 0.0, 0.0]]))


def test_grpo_loss_with_kl_hand_values():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.4)], [math.log(0.5), 0.0]])
    adv = torch.tensor([0.0, 0.0])
    loss, stats = grpo_loss(logp, logp.detach(), ref, adv, mask, kl_coef=0.1)
    k3 = [0.5 - 1 + math.log(2), 2 - 1 - math.log(2)]
    seq_kl = [(k3[0] + k3[1]) / 2, 0.0]
    assert stats["kl"].item() == pytest.approx(sum(seq_kl) / 2)
    assert loss.item() == pytest.approx(0.1 * sum(seq_kl) / 2)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - r, r = (0.5, 2, 1)
    expected = 0.1 * torch.tensor([[(1 - 0.5) / 4, (1 - 2.0) / 4], [0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_grpo_loss_clips_like_ppo():
    logp, old, adv, mask = ppo_case()
    g_loss, g_stats = grpo_loss(logp, old, logp.detach(), adv, mask, kl_coef=0.0)
    p_loss, p_stats = ppo_policy_loss(logp, old, adv, mask)
    # single sequence: sequence mean == token mean
    torch.testing.assert_close(g_loss, p_loss)
    torch.testing.assert_close(g_stats["clip_frac"], p_stats["clip_frac"])


# ---------------------------------------------------------------- aggregation


def agg_case():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, float("nan")]])  # padding holds garbage
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    return x, mask


def test_aggregations_hand_values():
    x, mask = agg_case()
    assert token_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert seq_mean_token_mean(x, mask).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert seq_mean_token_sum_norm(x, mask, const=6.0).item() == pytest.approx((6 / 6 + 4 / 6) / 2)
    # With the denominators of a larger update (8 tokens, 4 sequences): a share of its loss.
    norm = LossNorm(n_tokens=8.0, n_seqs=4.0, const=6.0)
    assert aggregate(x, mask, "token-mean", norm).item() == pytest.approx(10 / 8)
    assert aggregate(x, mask, "seq-mean-token-mean", norm).item() == pytest.approx((2 + 4) / 4)
    assert aggregate(x, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx((10 / 6) / 4)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(x, mask, "mean")
    with pytest.raises(ValueError, match="positive constant"):
        aggregate(x, mask, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_shares_add_up_to_the_whole_update(agg):
    """Lengths [6, 6, 1, 1] (the issue's case): the whole batch in one piece, or two micro-batches
    of two rows with the update's denominators, give the same value and per-token gradient."""
    lengths = torch.tensor([6, 6, 1, 1])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    logp = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    whole = policy_gradient_loss(logp, adv, mask, agg, LossNorm(const=6.0))
    (g_whole,) = torch.autograd.grad(whole, logp)
    norm = LossNorm(n_tokens=float(mask.sum()), n_seqs=4.0, const=6.0)
    parts = [policy_gradient_loss(logp[rows], adv[rows], mask[rows], agg, norm) for rows in ([0, 1], [2, 3])]
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(g_parts, g_whole)
    g = g_whole.abs()[mask]
    if agg == "token-mean":  # every token the same: 1/14
        torch.testing.assert_close(g, torch.full_like(g, 1 / 14))
    elif agg == "seq-mean-token-mean":  # 1 / (L * B): a 1-token response's token gets 6x
        torch.testing.assert_close(g_whole.abs()[2, 0] / g_whole.abs()[0, 0], torch.tensor(6.0))
    else:  # Dr. GRPO: 1 / (const * B) whatever the length
        torch.testing.assert_close(g, torch.full_like(g, 1 / 24))


def test_grpo_loss_honors_the_kl_estimator_and_the_aggregation():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.4)], [math.log(0.5), 0.0]])
    adv = torch.tensor([0.0, 0.0])
    _, stats = grpo_loss(logp, logp.detach(), ref, adv, mask, kl_coef=0.1, kl_estimator="k2")
    k2 = [0.5 * math.log(2) ** 2, 0.5 * math.log(2) ** 2]
    assert stats["kl"].item() == pytest.approx((k2[0] + k2[1]) / 2 / 2)
    loss, stats = grpo_loss(
        logp,
        logp.detach(),
        ref,
        adv,
        mask,
        kl_coef=0.1,
        kl_estimator="k2",
        agg="seq-mean-token-sum-norm",
        norm=LossNorm(const=4.0),
    )
    assert stats["kl"].item() == pytest.approx((k2[0] + k2[1]) / 4 / 2)
    assert loss.item() == pytest.approx(0.1 * (k2[0] + k2[1]) / 4 / 2)


# ---------------------------------------------------------------- reward model


def test_bradley_terry_hand_values():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([1.0, 1.0])
    loss, stats = bradley_terry_loss(rc, rr)
    # diffs (1, -1): -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin_mean"].item() == pytest.approx(0.0)
    assert stats["reward_mean"].item() == pytest.approx(1.0)
    assert stats["reward_std"].item() == pytest.approx(math.sqrt(0.5))
    loss.backward()
    # d/dr_c = -(1 - sigmoid(d)) / B
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(rc.grad, torch.tensor([-(1 - s(1)) / 2, -(1 - s(-1)) / 2]))


def test_bradley_terry_margin_and_centering():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, _ = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2)
    scalar_margin, _ = bradley_terry_loss(rc, rr, margin=0.5)
    torch.testing.assert_close(scalar_margin, loss)
    base, _ = bradley_terry_loss(rc, rr)
    centered, _ = bradley_terry_loss(rc, rr, center_coef=0.01)
    # (r_c + r_r)^2 = (9, 1) -> mean 5
    assert centered.item() == pytest.approx(base.item() + 0.01 * 5)


def test_bradley_terry_stable_for_confident_mistakes():
    loss, stats = bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0]))
    assert loss.item() == pytest.approx(1000.0)
    assert stats["accuracy"].item() == 0.0
