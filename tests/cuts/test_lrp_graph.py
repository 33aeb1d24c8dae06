"""The LRP rules one op at a time (against zennit's rules on the same layer, analytic gradients) and the graph rewrite
(model reproduced, batch norms merged, additive tensors found, ops without a rule named)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from funcam._src.cuts import lrp_rules as R
from funcam._src.cuts.lrp_graph import lrp_graph, merges
from funcam._src.cuts.lrp_ops import RULES


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vjp(fn, primals: tuple, cot: torch.Tensor) -> tuple:
    out, f = torch.func.vjp(fn, *primals)
    return out, f(cot)


def test_identity_rule_value_and_gradient():
    x = torch.randn(50, generator=gen(), dtype=torch.float64)
    g = torch.randn(50, generator=gen(1), dtype=torch.float64)
    y, (gx,) = vjp(lambda a: R.identity_rule(F.gelu(a), a), (x,), g)
    torch.testing.assert_close(y, F.gelu(x), rtol=0, atol=0)
    torch.testing.assert_close(gx, F.gelu(x) / x * g)  # R(x) = x gx = gelu(x) g = R(y)
    zero = torch.zeros(3, dtype=torch.float16)
    _, (g0,) = vjp(lambda a: R.identity_rule(F.gelu(a), a), (zero,), torch.ones(3, dtype=torch.float16))
    assert bool(torch.isfinite(g0).all())  # float16: the stabiliser does not underflow


def test_uniform_rule_at_products():
    a, b = torch.randn(4, 3, generator=gen(), dtype=torch.float64), torch.randn(3, 5, generator=gen(1),
                                                                                 dtype=torch.float64)
    g = torch.randn(4, 5, generator=gen(2), dtype=torch.float64)
    y, (ga, gb) = vjp(lambda p, q: R.product(torch.matmul, (True, True), p, q), (a, b), g)
    torch.testing.assert_close(y, a @ b)
    torch.testing.assert_close(ga, g @ b.T / 2)
    torch.testing.assert_close(gb, a.T @ g / 2)
    _, (ga1,) = vjp(lambda p: R.product(torch.matmul, (True, False), p, b), (a,), g)
    torch.testing.assert_close(ga1, g @ b.T)  # linear in the one input-dependent factor: its gradient
    # einsum's operand list
    y, (ga, gb) = vjp(lambda p, q: R.product(torch.einsum, (True, True), "ij,jk->ik", [p, q]), (a, b), g)
    torch.testing.assert_close(ga, g @ b.T / 2)


def test_layer_norm_holds_the_standard_deviation():
    x = torch.randn(2, 5, 8, generator=gen(), dtype=torch.float64)
    w, b = torch.randn(8, generator=gen(1), dtype=torch.float64), torch.randn(8, generator=gen(2), dtype=torch.float64)
    g = torch.randn(2, 5, 8, generator=gen(3), dtype=torch.float64)
    y, (gx,) = vjp(lambda a: R.layer_norm(a, (8,), w, b, 1e-5), (x,), g)
    torch.testing.assert_close(y, F.layer_norm(x, (8,), w, b, 1e-5))
    std = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    gw = g * w / std
    torch.testing.assert_close(gx, gw - gw.mean(-1, keepdim=True))  # the centring's gradient, std constant
    y, (gx,) = vjp(lambda a: R.group_norm(a, 2, None, None, 1e-5), (x.reshape(2, 4, 10),), g.reshape(2, 4, 10))
    torch.testing.assert_close(y, F.group_norm(x.reshape(2, 4, 10), 2, eps=1e-5))


@pytest.mark.parametrize("cp", [False, True])
def test_sdpa_rule_is_lxt_attention_rule(cp):
    """AttnLRP: the gradients at query and key / 4 and at value / 2 (lxt's efficient attention); CP-LRP: none at
    query and key, the plain one at value."""
    q, k, v = (torch.randn(2, 3, 6, 4, generator=gen(i), dtype=torch.float64) for i in range(3))
    g = torch.randn(2, 3, 6, 4, generator=gen(3), dtype=torch.float64)
    mask = torch.randn(6, 6, generator=gen(4), dtype=torch.float64)
    y, grads = vjp(lambda a, b_, c: R.sdpa(a, b_, c, mask, cp=cp), (q, k, v), g)
    want, plain = vjp(lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, mask), (q, k, v), g)
    torch.testing.assert_close(y, want)
    scale = (0.0, 0.0, 1.0) if cp else (0.25, 0.25, 0.5)
    for got, p, s in zip(grads, plain, scale):
        torch.testing.assert_close(got, p * s)


def zennit_relevance(rule, layer: nn.Module, x: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    handles = rule.register(layer)
    try:
        xx = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full backward hooks
            (r_in,) = torch.autograd.grad(layer(xx), xx, r_out)
    finally:
        handles.remove()
    return r_in


@pytest.mark.parametrize("name", ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_layer_rules_equal_zennit(name, kind):
    """One layer, inputs of both signs, an upstream relevance R(y): funcam's rule in the Gradient x Input form
    (cotangent R(y) / y, relevance x * gradient, or the tap's gradient for the first-layer rules) against zennit's."""
    from zennit import rules as zr

    torch.manual_seed(0)
    layer = (nn.Conv2d(3, 4, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)).double()
    shape = (2, 3, 5, 5) if kind == "conv" else (2, 6)
    x = torch.randn(shape, generator=gen(1), dtype=torch.float64)
    lo, hi = x.min() - 0.1, x.max() + 0.1
    y = layer(x).detach()
    r_out = torch.randn(y.shape, generator=gen(2), dtype=torch.float64)
    ours = {"epsilon": None, "zplus": R.zplus, "alpha_beta": R.alpha_beta, "gamma": R.gamma_rule, "zbox": R.zbox,
            "flat": R.flat}[name]
    theirs = {"epsilon": zr.Epsilon(), "zplus": zr.ZPlus(), "alpha_beta": zr.AlphaBeta(), "gamma": zr.Gamma(),
              "zbox": zr.ZBox(lo, hi), "flat": zr.Flat()}[name]
    op, rest = (torch.ops.aten.conv2d.default, ([1, 1], [1, 1], [1, 1], 1)) if kind == "conv" else (
        torch.ops.aten.linear.default, ())
    w, b = layer.weight.detach(), layer.bias.detach()
    t = torch.zeros_like(x)
    if name == "epsilon":
        _, (g,) = vjp(lambda a: R.epsilon(op(a, w, b, *rest)), (x,), r_out / y)
        got = x * g
    elif name in ("zbox", "flat"):
        extra = (lo.reshape(1), hi.reshape(1)) if name == "zbox" else ()
        _, (got,) = vjp(lambda tt: ours(op, rest, x, tt, w, b, *extra), (t,), r_out / y)
    else:
        _, (g,) = vjp(lambda a: ours(op, rest, a, w, b), (x,), r_out / y)
        got = x * g
    want = zennit_relevance(theirs, layer, x, r_out)
    assert bool(want.abs().max() > 0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", [R.zplus, R.alpha_beta, R.gamma_rule])
def test_nonneg_inputs_skip_a_term_exactly(rule):
    op, rest = torch.ops.aten.conv2d.default, ([1, 1], [1, 1], [1, 1], 1)
    x = torch.randn(2, 3, 5, 5, generator=gen(), dtype=torch.float64).relu()
    w, b = torch.randn(4, 3, 3, 3, generator=gen(1), dtype=torch.float64), torch.randn(4, generator=gen(2),
                                                                                        dtype=torch.float64)
    g = torch.randn(2, 4, 5, 5, generator=gen(3), dtype=torch.float64)
    _, (full,) = vjp(lambda a: rule(op, rest, a, w, b), (x,), g)
    _, (fast,) = vjp(lambda a: rule(op, rest, a, w, b, nonneg=True), (x,), g)
    torch.testing.assert_close(fast, full)


def test_merge_batch_norm_and_to_one():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3).double(), nn.BatchNorm2d(4).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    x = torch.randn(2, 3, 6, 6, generator=gen(), dtype=torch.float64)
    w, b = R.merge_batch_norm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)))
    y = torch.tensor([2.0, -4.0, 0.0], dtype=torch.float64)
    _, (g,) = vjp(R.to_one, (y,), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0.5, -0.25, 0.0], dtype=torch.float64))


def test_rewrite_reproduces_the_model_and_merges_its_batch_norms():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # in-place ReLU and residual add_
    x = torch.randn(2, 3, 32, 32, generator=gen())
    lg = lrp_graph(model, x, RULES["epsilon_plus"])
    assert len(merges(lg.cap)) == 20  # every conv's batch norm, the downsampling ones included
    t = torch.zeros_like(x)
    with torch.no_grad():
        torch.testing.assert_close(lg.run(model, x, t, x, x), model(x), rtol=1e-4, atol=1e-5)
    assert lg.n_scales == 0
    # the budget's rewrite: each of the 20 merged biases and fc's bias times its own scale, the model still
    budget = lrp_graph(model, x, RULES["epsilon_plus"], cap=lg.cap, budget=True)
    assert budget.n_scales == 21
    with torch.no_grad():
        torch.testing.assert_close(budget.run(model, x, t, x, x, x.new_ones(21)), model(x), rtol=1e-4, atol=1e-5)


class Atan(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.atan(x).mean(dim=(2, 3)))


def test_an_op_without_a_rule_is_named():
    with pytest.raises(ValueError, match=r"no LRP rule for an op in the captured graph: atan \(atan"):
        lrp_graph(Atan().eval(), torch.randn(2, 4, 8, 8), RULES["attnlrp"])


class Tokens(nn.Module):
    """Patches -> tokens -> LayerNorm (the module, or written out with var_mean and rsqrt) -> GELU MLP -> mean."""

    def __init__(self, by_hand: bool):
        super().__init__()
        self.by_hand = by_hand
        self.embed, self.norm, self.fc1, self.fc2 = nn.Conv2d(3, 8, 4, 4), nn.LayerNorm(8), nn.Linear(8, 16), \
            nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.by_hand:
            var, mean = torch.var_mean(t, dim=-1, keepdim=True, correction=0)
            t = (t - mean) * torch.rsqrt(var + self.norm.eps) * self.norm.weight + self.norm.bias
        else:
            t = self.norm(t)
        return self.fc2(F.gelu(self.fc1(t))).mean(dim=1)


def test_a_hand_written_layer_norm_gets_layer_norms_rule():
    """var_mean and rsqrt held constant, the centring and the products with constants kept: the same relevance as
    the LayerNorm op's rule (standard deviation constant)."""
    from tests.conftest import lrp

    torch.manual_seed(0)
    a = Tokens(False).double().eval()
    with torch.no_grad():
        a.norm.weight.normal_()
        a.norm.bias.normal_()
    b = Tokens(True).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=gen(), dtype=torch.float64)
    want = lrp(a, x, [0, 3]).maps
    assert bool(want.abs().max() > 0)
    torch.testing.assert_close(lrp(b, x, [0, 3]).maps, want)


class LinearNorm(nn.Module):
    """LeViT's ``LinearNorm``: a linear layer without bias, then BatchNorm1d over its tokens flattened to rows."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LeViTMlp(nn.Module):
    """Patches -> tokens (B, 16, 8) -> LinearNorm -> ReLU -> LinearNorm -> tokens flattened -> linear head."""

    def __init__(self):
        super().__init__()
        self.embed, self.ln1, self.act, self.ln2 = nn.Conv2d(3, 8, 4, 4), LinearNorm(8, 16), nn.ReLU(), \
            LinearNorm(16, 8)
        self.head = nn.Linear(16 * 8, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.ln2(self.act(self.ln1(t))).flatten(1))


def test_batch_norm_after_a_flattened_linear_is_merged_as_zennit_merges_it():
    """LeViT's LinearNorm: the batch norm reads the linear layer's output through ``flatten(0, 1)`` (its other reader,
    ``reshape_as``, takes only the shape). zennit's ``SequentialMergeBatchNorm`` merges it (by module order), and so
    must the rewrite: passed instead (``Pass``), its ratio y / x grows wherever the linear output is near 0 while the
    norm's shift is not, and on timm's levit_128s the relevance overflowed float32. EpsilonPlus against zennit's."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    from tests.conftest import lrp

    torch.manual_seed(0)
    model = LeViTMlp().double().eval()
    g = gen(1)
    with torch.no_grad():
        for bn in (model.ln1.bn, model.ln2.bn):
            bn.weight.copy_(1 + 0.3 * torch.randn(bn.weight.shape, generator=g, dtype=torch.float64))
            bn.bias.copy_(0.5 * torch.randn(bn.bias.shape, generator=g, dtype=torch.float64))
            bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g, dtype=torch.float64))
            bn.running_var.copy_(1 + torch.rand(bn.running_var.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 3, 16, 16, generator=gen(2), dtype=torch.float64)
    lg = lrp_graph(model, x, RULES["epsilon_plus"])
    assert sorted(n.name for n in merges(lg.cap)) == ["linear", "linear_1"]
    got = lrp(model, x, torch.tensor([[3, 0], [5, 1]]), rule="epsilon_plus", per_channel=True).maps
    want = []
    for k in range(2):
        one_hot = torch.zeros(2, 10, dtype=torch.float64)
        one_hot[0, [3, 0][k]] = one_hot[1, [5, 1][k]] = 1
        with warnings.catch_warnings(), Gradient(copy.deepcopy(model), EpsilonPlus(
                canonizers=[SequentialMergeBatchNorm()])) as attributor:
            warnings.simplefilter("ignore")  # zennit's full backward hooks warn
            want.append(attributor(x.clone(), one_hot)[1])
    want = torch.stack(want, dim=1)
    assert bool(want.abs().max() > 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))


def test_batch_norm_over_other_axes_is_not_merged():
    """A batch norm whose channels are not the linear layer's outputs (a transpose, or a reshape that splits them)
    is left unmerged; the rewrite still reproduces the model."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1 = nn.Linear(8, 6), nn.BatchNorm1d(4)  # over the 4 tokens
            self.fc2, self.bn2 = nn.Linear(8, 6), nn.BatchNorm1d(3)  # over halves of the 6 outputs

        def forward(self, t):  # (B, 4, 8)
            a = self.bn1(self.fc1(t))
            b = self.fc2(t)
            return (a.flatten(1) + self.bn2(b.reshape(-1, 3)).reshape_as(b).flatten(1)).sum(1)

    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
    x = torch.randn(2, 4, 8, generator=gen())
    lg = lrp_graph(model, x, RULES["epsilon_plus"])
    assert merges(lg.cap) == {}
    with torch.no_grad():
        torch.testing.assert_close(lg.run(model, x, x, x, x), model(x))
