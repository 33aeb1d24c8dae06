"""Grad-CAM from the head's Jacobian in a spatially constant shift (funcam/_src/core/engine.py,
``_shift_jacobian_maps``): with more classes than channels, the weights come from C forward-mode passes instead of
K reverse ones. Pinned in float64 to the per-class path (``chunk_size`` forces it) and to a plain autograd loop,
for the ViT routes (CLS-pooled prefix-only head, average-pooled MLP linearisation), an MLP head and a graph cut,
with class indices and with a score callable."""
from __future__ import annotations

import pytest
import timm
from timm.models.vgg import VGG
import torch
from torch import nn

import funcam
from funcam._src.base import as_features
from tests._oracle import loop_cams


def _models():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=250)  # C = 192 < K
    vit_avg = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=250, global_pool="avg")
    # timm's VGG with its ConvMlp head (no pooled fast path), narrowed: C = 32 < K = 100
    vgg = VGG(cfg=[16, "M", 32, "M", 32, "M"], num_classes=100, mlp_ratio=1 / 64)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 40))
    return {"vit": (vit, 32, {}), "vit_avg": (vit_avg, 32, {}), "vgg": (vgg, 64, {}), "graph": (net, 8, {"layer": "1"})}


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shift_jacobian_equals_per_class_path_and_loop(name):
    model, size, kw = MODELS[name]
    model = model.double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sp = funcam.split(model, example=x, **kw) if kw else funcam.split(model)
    n = model(x).shape[1]
    c = as_features(sp.extract(x))[0].maps[0].shape[1]
    assert n > c, "the Jacobian path needs more classes than channels"
    classes = torch.arange(n).flip(0)
    fast = funcam.gradcam(sp, x, classes, relu=False)
    per_class = funcam.gradcam(sp, x, classes, relu=False, chunk_size=n // 3)
    torch.testing.assert_close(fast, per_class, rtol=1e-9, atol=1e-14)
    some = [0, n // 2, n - 1]
    torch.testing.assert_close(fast[:, [n - 1 - k for k in some]], loop_cams(sp, x, lambda out: out[:, some], "gradcam"), rtol=1e-9, atol=1e-14)
    assert fast.abs().amax() > 0 and fast.flatten(2).std(-1).min() > 0  # not all zero, not constant


def test_shift_jacobian_with_a_score_callable():
    model, size, kw = MODELS["graph"]
    model = model.double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sp = funcam.split(model, example=x, **kw)

    def scores(out):
        return out.softmax(-1)[:, :30]  # K = 30 > C = 8

    fast = funcam.gradcam(sp, x, scores, relu=False)
    per_class = funcam.gradcam(sp, x, scores, relu=False, chunk_size=7)
    torch.testing.assert_close(fast, per_class, rtol=1e-9, atol=1e-16)
    assert fast.abs().amax() > 0
