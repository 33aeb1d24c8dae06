"""The fast paths are pinned to the general path's numbers (float64, all methods, every form of ``classes``).

- pooled heads (global average pooling first): weights from the classifier's rows, maps from one product;
- CLS-pooled ViTs: only the prefix tokens' attention rows in the head, keys/values re-associated;
- automatic chunking from ``max_memory``.
"""
from __future__ import annotations

import pytest
import timm
import torch

import funcam
from funcam._src.cuts.timm import _cat
from funcam._src.cuts.attention import attend
from funcam._src.base import as_features
from funcam._src.core import rules
from funcam._src.core.split import Features
from conftest import make_input, make_model

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


@pytest.mark.parametrize("name", POOLED)
@pytest.mark.parametrize("method", funcam.METHODS)
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
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5, global_pool=pool).eval()
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
    blk, npre = model.blocks[-1], model.num_prefix_tokens

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


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "vgg11"])
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
        funcam.gradcam(funcam.split(make_model("vgg11")), make_input("vgg11"), [1], max_memory=bad)
