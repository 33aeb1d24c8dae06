"""Rows of ``benchmarks/supported_models.md`` that were once not "ok", reduced to tiny models: regression tests.

Each test states the behaviour funcam promises (a correct map or a clear error, never a silently wrong one). Tiny
random-weight models with all-zero parameters filled with noise, as in the benchmark.
"""
from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import funcam
from benchmarks.supported_models import fill_zeros, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_tv_swin(v2: bool = False) -> SwinTransformer:
    """torchvision Swin, 32 px: stage grids 8x8 and 4x4, both padded up to 7x7 windows."""
    torch.manual_seed(0)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[7, 7],
                            num_classes=5, **kw).eval()
    fill_zeros(model)
    return model


def test_padded_window_relevance_is_on_the_feature_grid_or_refused(x):
    model = tiny_tv_swin()
    split = funcam.split(model, example=x)
    grid = funcam.gradcam(split, x, [0, 1]).shape[-2:]
    assert tuple(grid) == (4, 4)
    try:
        with torch.no_grad():
            maps = funcam.chefer_relevance(split, x, [0, 1])
    except ValueError:
        return  # a clear refusal is fine
    assert maps.shape[-2:] == grid


def test_guided_backprop_is_not_the_plain_gradient_of_a_gelu_network(x):
    model = tiny_tv_swin(v2=True)
    try:
        guided = funcam.guided_backprop(model, x, [0])
    except ValueError:
        return  # "needs ReLU activations": the promised refusal
    xx = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(xx)[:, 0].sum(), xx)
    assert (guided[:, 0] - plain).abs().max() > 1e-5 * plain.abs().max()


def test_relevance_of_a_class_attention_model_warns_nothing(x):
    torch.manual_seed(0)
    model = timm.models.cait.Cait(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, depth_token_only=1,
                                  num_classes=5).eval()
    fill_zeros(model)
    with torch.no_grad():
        maps = funcam.chefer_relevance(model, x, [0, 1])  # pytest turns warnings into errors
    assert maps.shape == (2, 2, 4, 4)


def test_hf_swin_default_cut(x):
    model = hf_model("swin")(32).eval()
    fill_zeros(model)
    split = funcam.split(model, example=x)
    assert split.layers == ("swin.layernorm",)
    named = funcam.split(model, layer="swin.layernorm", example=x)
    assert torch.allclose(funcam.gradcam(split, x, [0, 1]), funcam.gradcam(named, x, [0, 1]))


def test_guided_backprop_of_a_relu_transformer_warns_nothing(x):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                              act_layer=torch.nn.ReLU).eval()
    with torch.no_grad():
        grads = funcam.guided_backprop(model, x, [0, 1])  # pytest turns warnings into errors
    assert grads.shape == (2, 2, 3, 32, 32)
