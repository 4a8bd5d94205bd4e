import math

import pytest
import torch

from lmforge.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3

LOGP = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
REF = torch.tensor([math.log(0.25), math.log(0.4), math.log(0.3)])


def test_hand_values():
    # log r = ref - logp = (-log 2, log 2, 0)
    l2 = math.log(2.0)
    torch.testing.assert_close(kl_k1(LOGP, REF), torch.tensor([l2, -l2, 0.0]))
    torch.testing.assert_close(kl_k2(LOGP, REF), torch.tensor([0.5 * l2**2, 0.5 * l2**2, 0.0]))
    # k3 = r - 1 - log r with r = 1/2, 2, 1
    torch.testing.assert_close(kl_k3(LOGP, REF), torch.tensor([0.5 - 1 + l2, 2 - 1 - l2, 0.0]))


def test_kl_estimate_dispatch():
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_estimate(LOGP, REF, kind), fn(LOGP, REF))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(LOGP, REF, "k4")


def test_k2_k3_nonnegative_and_k3_precise_near_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (kl_k2(a, b) >= 0).all() and (kl_k3(a, b) >= 0).all()
    d = torch.tensor([1e-4])
    # k3 ~ d^2 / 2 for small d; naive exp(d) - 1 - d in float32 loses it entirely
    assert kl_k3(torch.zeros(1), d).item() == pytest.approx(0.5e-8, rel=1e-3)


def test_monte_carlo_unbiased():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])  # policy: the samples come from here
    q = torch.tensor([0.3, 0.3, 0.2, 0.2])  # reference
    true_kl = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(1234)
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, ref = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        est = kl_estimate(logp, ref, kind)
        stderr = est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - true_kl) < 5 * stderr, kind
    # k3 is the low-variance one, the reason GRPO uses it
    assert kl_k3(logp, ref).std() < kl_k1(logp, ref).std()


def test_adaptive_controller_hand_sequence():
    c = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # kl 9 -> error 0.5 clipped to 0.2; mult 1 + 0.2 * 256 / 10000
    assert c.update(9.0, 256) == pytest.approx(0.2 * 1.00512)
    # on target -> unchanged
    assert c.update(torch.tensor(6.0), 256) == pytest.approx(0.2 * 1.00512)
    # kl 3 -> error -0.5 clipped to -0.2; mult 1 - 0.2 * 512 / 10000
    assert c.update(3.0, 512) == pytest.approx(0.2 * 1.00512 * 0.98976)
    # kl 6.6 -> error 0.1 (inside the clip); mult 1 + 0.1 * 1000 / 10000
    assert c.update(6.6, 1000) == pytest.approx(0.2 * 1.00512 * 0.98976 * 1.01)
    assert c.value == pytest.approx(0.2 * 1.00512 * 0.98976 * 1.01)


def test_adaptive_controller_state_roundtrip():
    c = AdaptiveKLController(0.1, 6.0, 10_000)
    c.update(100.0, 5000)
    assert c.value == pytest.approx(0.11)
    d = AdaptiveKLController(0.1, 6.0, 10_000)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    assert d.update(0.0, 5000) == pytest.approx(0.11 * 0.9)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 10_000)


def test_fixed_controller():
    c = FixedKLController(0.05)
    assert c.update(100.0, 1000) == 0.05 and c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05
