"""The per-class rules (funcam/_src/core/rules.py) against the same equations written by hand in tests/_oracle.py,
on random gradients and features in float64: the general rule on (B, C, h, w), the channel-weights form where a
method has one (map = sum_c w_c A_c), and the pooled rule on a spatially constant gradient."""
from __future__ import annotations

import pytest
import torch

from funcam._src.core import methods, rules
from tests._oracle import rule

CAMS = [m for m in methods.TABLE.values() if m.kind == "cam"]
IDS = [m.name for m in CAMS]


def _data(seed: int, signed_a: bool = True):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    grad[0, 1] = 0  # a channel with no gradient: Grad-CAM++'s alpha = 0 rule
    a = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    return grad, (a if signed_a else a.abs())


@pytest.mark.parametrize("m", CAMS, ids=IDS)
@pytest.mark.parametrize("signed_a", [True, False], ids=["signed-A", "post-relu-A"])
def test_rule_is_the_equation(m, signed_a):
    g, a = _data(0, signed_a)
    got = m.rule(g, a)
    want = rule(m.name, g, a)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (3, 4, 6) and bool((got != 0).any())


@pytest.mark.parametrize("m", [m for m in CAMS if m.weights is not None], ids=lambda m: m.name)
def test_weights_times_features_is_the_rule(m):
    g, a = _data(1)
    w = m.weights(g, a)
    assert w.shape == (3, 5) and bool((w != 0).any())
    torch.testing.assert_close(rules.weighted_sum(w, a), m.rule(g, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", CAMS, ids=IDS)
@pytest.mark.parametrize("signed_a", [True, False], ids=["signed-A", "post-relu-A"])
def test_pooled_rule_equals_the_rule_on_a_constant_gradient(m, signed_a):
    _, a = _data(2, signed_a)
    v = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # (B, K, C)
    v[:, 2, 1] = 0
    got = m.pooled(v, a)
    g = v[..., None, None].expand(3, 7, 5, 4, 6)  # g[b, k, c, i, j] = v[b, k, c]
    want = torch.stack([m.rule(g[:, k], a) for k in range(7)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (3, 7, 4, 6) and bool((got != 0).any())


def test_gradcampp_eq19_by_hand_on_one_channel():
    # one channel, one position with g = 0: alpha = g^2 / (2 g^2 + sum(A) g^3 + eps), 0 where g == 0
    g = torch.tensor([[[[1.0, -2.0], [0.0, 0.5]]]], dtype=torch.float64)
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    s = 10.0
    alpha = [1 / (2 + s + 1e-6), 4 / (8 - 8 * s + 1e-6), 0.0, 0.25 / (0.5 + 0.125 * s + 1e-6)]
    w = 1.0 * alpha[0] + 0.5 * alpha[3]  # relu(g) drops the negative position
    torch.testing.assert_close(rules.gradcampp_weights(g, a), torch.tensor([[w]], dtype=torch.float64))


def test_empty_class_dimension_on_the_pooled_rules():
    _, a = _data(4)
    for m in CAMS:
        assert m.pooled(a.new_zeros(3, 0, 5), a).shape == (3, 0, 4, 6), m.name
