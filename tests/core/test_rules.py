"""The per-class rules (funcam/_src/core/rules.py) against the same equations written by hand in tests/_oracle.py,
on random gradients and features in float64: the general rule on (B, C, h, w), the channel-weights form where a
method has one (map = sum_c w_c A_c), and the pooled rule on a spatially constant gradient."""
from __future__ import annotations

import copy

import pytest
import torch

import funcam
from funcam._src.core import methods, rules
from funcam._src.core.weighted import rule_of
from tests._oracle import rule
from tests.conftest import make_model

# (name, its Rule) of every channel-weighting CAM of the table
CAMS = [(n, rule_of(methods.TABLE[n].compute)) for n in methods.CAM_METHODS]
IDS = [n for n, _ in CAMS]


def _data(seed: int, signed_a: bool = True):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    grad[0, 1] = 0  # a channel with no gradient: Grad-CAM++'s alpha = 0 rule
    a = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    return grad, (a if signed_a else a.abs())


@pytest.mark.parametrize("name,m", CAMS, ids=IDS)
@pytest.mark.parametrize("signed_a", [True, False], ids=["signed-A", "post-relu-A"])
def test_rule_is_the_equation(name, m, signed_a):
    g, a = _data(0, signed_a)
    got = m.per_class(g, a)
    want = rule(name, g, a)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (3, 4, 6) and bool((got != 0).any())


@pytest.mark.parametrize("name,m", [(n, m) for n, m in CAMS if m.weights is not None],
                         ids=[n for n, m in CAMS if m.weights is not None])
def test_weights_times_features_is_the_rule(name, m):
    g, a = _data(1)
    w = m.weights(g, a)
    assert w.shape == (3, 5) and bool((w != 0).any())
    torch.testing.assert_close(rules.weighted_sum(w, a), m.per_class(g, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,m", CAMS, ids=IDS)
@pytest.mark.parametrize("signed_a", [True, False], ids=["signed-A", "post-relu-A"])
def test_pooled_rule_equals_the_rule_on_a_constant_gradient(name, m, signed_a):
    _, a = _data(2, signed_a)
    v = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # (B, K, C)
    v[:, 2, 1] = 0
    got = m.pooled(v, a)
    g = v[..., None, None].expand(3, 7, 5, 4, 6)  # g[b, k, c, i, j] = v[b, k, c]
    want = torch.stack([m.per_class(g[:, k], a) for k in range(7)], dim=1)
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
    for name, m in CAMS:
        assert m.pooled(a.new_zeros(3, 0, 5), a).shape == (3, 0, 4, 6), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_gradcampp_alpha_has_finite_gradients_where_g_is_zero(dtype):
    # eq. 19's alpha is 0 where g == 0; its backward must not form 0 / eps^2 there (NaN in half precision, where
    # eps^2 = 1e-12 underflows), and in float32 / float64 the values are the hand formula's
    g = torch.tensor([[[[0.0, 0.5], [-0.25, 0.0]]], [[[1e-3, 0.0], [0.0, -2.0]]]], dtype=torch.float64)
    a = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]]], [[[0.5, 0.0], [0.0, 3.0]]]], dtype=torch.float64)
    g, a = g.to(dtype).requires_grad_(), a.to(dtype).requires_grad_()
    for fn in (rules.gradcampp_weights, lambda g, a: rules.pooled_gradcampp(g[:, None, :, 0, 0], a)):
        w = fn(g, a)
        dg, da = torch.autograd.grad(w.sum(), (g, a))
        assert torch.isfinite(dg).all() and torch.isfinite(da).all() and torch.isfinite(w).all()
    gd, ad = g.detach().double(), a.detach().double()
    s = ad.sum(dim=(2, 3), keepdim=True)
    alpha = torch.where(gd != 0, gd**2 / (2 * gd**2 + s * gd**3 + rules.GRADCAMPP_EPS), torch.zeros_like(gd))
    want = (torch.relu(gd) * alpha).sum(dim=(2, 3))
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(rules.gradcampp_weights(g, a).double(), want, rtol=tol, atol=tol)
    assert want.abs().amax() > 0


def test_gradcampp_maps_of_a_half_precision_model_have_finite_input_gradients():
    # found by the slow property test: resnet18 in float16 at 33x33, class 0, d maps / d x was NaN everywhere
    model = copy.deepcopy(make_model("resnet18")).half()
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0)).half().requires_grad_()
    maps = funcam.cam(model, x, 0, method="gradcampp").maps
    (gx,) = torch.autograd.grad(maps.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().amax() > 0 and maps.abs().amax() > 0
