"""The fast paths are pinned to the general path's numbers (float64, all methods, every form of ``classes``).

- pooled heads (global average pooling first): weights from the classifier's rows, maps from one product; found
  on timm's ``forward_head`` and, from the graph and a numeric probe, on graph-route and FX cuts;
- CLS-pooled ViTs: only the prefix tokens' attention rows in the head, keys/values re-associated;
- automatic chunking from ``max_memory``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import funcam
from funcam._src.base import as_features
from funcam._src.core import engine, rules
from funcam._src.core.split import Features
from funcam._src.cuts.attention import attend
from funcam._src.cuts.blocks import cat_prefix as _cat
from funcam._src.cuts.pooled import averages_first
from tests._oracle import loop_cams
from tests.conftest import make_input, make_model, timm_model, tv_model

POOLED = ["resnet18", "convnext_atto", "tf_efficientnet_lite0", "regnetx_002", "mobilenetv3_small_050", "densenet121"]
CLASS_FORMS = {
    "shared": lambda: torch.tensor([0, 3, 7, 3]),
    "per_image": lambda: torch.tensor([[1, 2], [9, 4], [5, 5]]),
    "top_k": lambda: None,
    "callable": lambda: (lambda logits: logits.softmax(-1)[:, [2, 6]]),
}


def _agree(fast, slow, tol=1e-10):
    assert fast.maps.shape == slow.maps.shape
    assert torch.count_nonzero(slow.maps) > 0
    torch.testing.assert_close(fast.maps, slow.maps, atol=tol * max(1.0, slow.maps.abs().max().item()), rtol=0)
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-10, rtol=0)
    if slow.classes is None:
        assert fast.classes is None
    else:
        assert torch.equal(fast.classes, slow.classes)


# three rules (a weight rule, Grad-CAM++'s pooled form, a per-position rule) on every pooled family in the fast set
@pytest.mark.parametrize("name", POOLED)
@pytest.mark.parametrize("method", [m if m in ("gradcam", "gradcampp", "layercam")
                                    else pytest.param(m, marks=pytest.mark.slow) for m in funcam.METHODS])
def test_pooled_head_equals_general_path(name, method):
    model = make_model(name, dtype=torch.float64)
    x = make_input(name, batch=3, dtype=torch.float64)
    sp = funcam.split(model)
    assert sp.pooled is not None, f"{name}: the head starts with average pooling, the fast path must apply"
    general = sp._replace(pooled=None)
    for form, make in CLASS_FORMS.items():
        kw = {"top_k": 3} if form == "top_k" else {}
        _agree(funcam.cam(sp, x, make(), method=method, relu=False, **kw),
               funcam.cam(general, x, make(), method=method, relu=False, **kw))


def _tv_resnet18():
    return tv_model("resnet18").to(torch.float64)


def _x(batch=3, size=64, channels=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def cut_splits():
    """torchvision resnet18 cut at its last stage by the three routes that previously never got ``pooled``: the
    graph route captured on first use, the graph route captured at ``example=``, FX (a node name)."""
    model = _tv_resnet18()
    return model, {"graph": funcam.split(model, "layer4"),
                   "graph_example": funcam.split(model, "layer4", example=_x()),
                   "fx": funcam.split(model, "layer4_1_relu_1")}


def _pooled_of(sp, x):
    """What the engine sees: the static ``Pooled``, or the graph route's lookup for x's capture."""
    return sp.pooled(sp.extract(x)) if callable(sp.pooled) else sp.pooled


@pytest.mark.parametrize("route", ["graph", "graph_example", "fx"])
@pytest.mark.parametrize("method", [m if m in ("gradcam", "gradcampp", "layercam")
                                    else pytest.param(m, marks=pytest.mark.slow) for m in funcam.METHODS])
def test_graph_and_fx_cuts_take_the_pooled_path(cut_splits, route, method, monkeypatch):
    """Issue 18: a torchvision head (adaptive average pool -> flatten -> fc) is found pooled from its graph and a
    numeric probe, and the fast path gives the general path's maps for every form of ``classes``."""
    _, splits = cut_splits
    sp, x = splits[route], _x()
    assert sp.pooled is not None and _pooled_of(sp, x) is not None
    taken = []
    real = engine._pooled_maps
    monkeypatch.setattr(engine, "_pooled_maps", lambda *a, **k: taken.append(1) or real(*a, **k))
    general = sp._replace(pooled=None)
    for form, make in CLASS_FORMS.items():
        kw = {"top_k": 3} if form == "top_k" else {}
        fast = funcam.cam(sp, x, make(), method=method, relu=False, **kw)
        n = len(taken)
        _agree(fast, funcam.cam(general, x, make(), method=method, relu=False, **kw))
        assert len(taken) == n > 0, f"{form}: the fast path must be taken for the pooled split only"


class _Head(nn.Module):
    """conv (the cut) then one of the heads that must keep the general path, on 3x8x8 inputs."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.skip = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 64 if kind == "flatten" else 4, 5)

    def forward(self, x):
        a = self.conv(x)
        if self.kind == "max":
            return self.fc(torch.flatten(nn.functional.adaptive_max_pool2d(a, 1), 1))
        if self.kind == "flatten":
            return self.fc(torch.flatten(a, 1))
        # a skip over the cut: the cut value is only averaged, but the head also reads a value from before it
        return self.fc(a.mean((2, 3)) + self.skip(x).mean((2, 3)))


@pytest.mark.parametrize("kind", ["max", "flatten", "skip"])
def test_heads_that_do_not_only_average_the_cut_keep_the_general_path(kind):
    model = _Head(kind).to(torch.float64).eval()
    x = _x(size=8)
    splits = [funcam.split(model, "conv", example=x), funcam.split(model, "conv"),
              funcam.split(model, "conv", tracer_leaves=(nn.Conv2d,))]  # graph now, graph on first use, FX
    assert splits[0].pooled is None and splits[2].pooled is None
    for sp in splits:
        assert _pooled_of(sp, x) is None
        got = funcam.cam(sp, x, [0, 3], method="gradcampp", relu=False).maps
        want = loop_cams(sp, x, lambda out: out[:, [0, 3]], "gradcampp")
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_average_probe_refuses_position_dependent_heads():
    """The numeric half of the check on its own: heads written as functions of a (2, 4, 3, 5) map."""
    like = torch.zeros(2, 4, 3, 5, dtype=torch.float64)
    w = torch.randn(4 * 15, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert averages_first(lambda a: a.mean((2, 3)) @ w[:4], like)
    assert averages_first(lambda a: nn.functional.adaptive_avg_pool2d(a, 1).flatten(1).tanh() @ w[:4], like)
    assert not averages_first(lambda a: a.amax((2, 3)) @ w[:4], like)
    assert not averages_first(lambda a: a.flatten(1) @ w, like)
    assert not averages_first(lambda a: a.relu().mean((2, 3)) @ w[:4], like)  # an op before the average
    # positions weighted by a ramp averaging to 1: equal to the plain mean on a constant map only
    ramp = torch.linspace(0.5, 1.5, 15, dtype=torch.float64).reshape(3, 5)
    assert not averages_first(lambda a: (a * ramp).mean((2, 3)) @ w[:4], like)
    assert not averages_first(lambda a: a.mean((2, 3)) @ w[:4], like.float().half())  # half precision: refused


@pytest.mark.parametrize("name", ["convnext_atto", "resnet18"])
def test_pooled_elementwise_is_two_products_of_signed_parts(name):
    """Element-wise Grad-CAM on the pooled path: sum_c relu(v_c A_c) as relu(v) relu(A) + min(v, 0) min(A, 0)
    channel sums. Against the general rule looped over classes on the broadcast gradient, with gradients of
    both signs; convnext's features are signed too (LayerNorm, no ReLU at the cut), so the negative-times-
    negative term is exercised there; resnet's are post-ReLU (that term is then zero)."""
    model = make_model(name, dtype=torch.float64)
    x = make_input(name, batch=3, dtype=torch.float64)
    sp = funcam.split(model)
    assert sp.pooled is not None
    (a,) = as_features(sp.extract(x))[0].maps  # (B, C, h, w)
    a = a.detach()
    b, c, h, w = a.shape
    v = torch.randn(b, 5, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = rules.pooled_elementwise(v, a)
    want = torch.stack([rules.elementwise(v[:, k, :, None, None].expand(b, c, h, w), a) for k in range(5)], dim=1)
    assert torch.count_nonzero(want) > 0
    torch.testing.assert_close(got, want, atol=1e-12 * float(want.abs().max()), rtol=0)
    negative = rules.channel_sum(v.clamp(max=0), a.clamp(max=0))
    assert bool((a < 0).any()) == (name == "convnext_atto") and bool((negative != 0).any()) == (name == "convnext_atto")
    # the engine: the pooled path equals the general one with the model's own gradients, relu off and on (the
    # map is a sum of ReLUs: relu=True changes nothing)
    general = sp._replace(pooled=None)
    classes = torch.tensor([[0, 3, 7, 3], [9, 1, 1, 4], [2, 8, 5, 6]])
    for relu in (False, True):
        _agree(funcam.cam(sp, x, classes, method="elementwise", relu=relu),
               funcam.cam(general, x, classes, method="elementwise", relu=relu))
    off = funcam.cam(sp, x, torch.arange(10), method="elementwise", relu=False).maps
    assert torch.equal(off, funcam.cam(sp, x, torch.arange(10), method="elementwise").maps) and bool((off >= 0).all())


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_other_pooling_keeps_the_general_path(pool):
    model = timm_model("resnet18", num_classes=5, global_pool=pool)
    assert funcam.split(model).pooled is None


def test_heads_without_average_pooling_first_keep_the_general_path():
    for name in ["vgg11", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]:
        assert funcam.split(make_model(name)).pooled is None, name


def test_pooled_head_is_differentiable_like_the_general_path():
    """A CAM loss backpropagates to the parameters the same way through both paths."""
    model = make_model("resnet18", dtype=torch.float64)
    x = make_input("resnet18", dtype=torch.float64)
    sp = funcam.split(model)
    params = [model.fc.weight, model.layer4[-1].conv2.weight, model.layer3[0].conv1.weight]
    grads = []
    for s in (sp, sp._replace(pooled=None)):
        loss = funcam.gradcampp(s, x, [1, 4]).square().mean()
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert any(torch.count_nonzero(g) for g in grads[0])


def _full_attention_split(model, sp):
    """The norm1 split with the original head: full attention over all tokens, then the whole block."""
    blk = model.blocks[-1]

    def head(feats: Features):
        (fmap,), (t, prefix) = feats.maps, feats.context
        tokens = _cat(prefix, fmap.flatten(2).transpose(1, 2))
        t = t + blk.drop_path1(blk.ls1(attend(blk.attn, tokens)))
        t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
        return model.forward_head(model.norm(t))
    return sp._replace(head=head)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam", "layercam"])
def test_prefix_only_vit_head_equals_full_attention(name, method):
    model = make_model(name, dtype=torch.float64)
    x = make_input(name, batch=2, dtype=torch.float64)
    sp = funcam.split(model)
    assert sp.layers[0].endswith("norm1")
    funcam.check_split(sp, x, model, atol=1e-10)
    _agree(funcam.cam(sp, x, [0, 5, 9], method=method, relu=False),
           funcam.cam(_full_attention_split(model, sp), x, [0, 5, 9], method=method, relu=False), tol=1e-9)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_automatic_chunks_equal_one_chunk(name):
    model = make_model(name)
    x = make_input(name)
    sp = funcam.split(model)
    whole = funcam.cam(sp, x, torch.arange(10), method="gradcampp", max_memory=2**40)
    tiny = funcam.cam(sp, x, torch.arange(10), method="gradcampp", max_memory=1)  # one class per chunk
    assert torch.count_nonzero(whole.maps) > 0
    torch.testing.assert_close(tiny.maps, whole.maps, atol=1e-6, rtol=1e-5)
    assert funcam._src.core.engine.auto_chunk_size(100, 10, 1000) is None
    assert funcam._src.core.engine.auto_chunk_size(100, 10, 250) == 2


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_max_memory_must_be_positive_bytes(bad):
    with pytest.raises(ValueError, match=r"max_memory must be None or a positive number of bytes, got"):
        funcam.cam(make_model("resnet18"), make_input("resnet18"), [1], max_memory=bad)  # checked before the split
