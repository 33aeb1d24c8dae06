"""Rows of ``benchmarks/supported_models.md`` that were once not "ok", reduced to tiny models: regression tests.

Each test states the behaviour funcam promises (a correct map or a clear error, never a silently wrong one). Tiny
random-weight models with all-zero parameters filled with noise, as in the benchmark.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from captum.attr import GuidedBackprop
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import funcam
from benchmarks.supported_models import fill_zeros, hf_model
from tests._oracle import attention_grads, hook_grads, nhwc, relevance_matrix, rule

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


def test_padded_windows_gradcam_on_the_feature_grid_and_relevance_refused(x):
    """Windows padded up to 7x7: Grad-CAM is on the final 4x4 feature grid and equals the hook oracle at the cut
    (NHWC, written by hand); relevance is refused with the windowed-attention error, not a map on a padded grid."""
    model = tiny_tv_swin()
    split = funcam.split(model, example=x)
    assert split.layers == ("norm",)
    got = funcam.gradcam(split, x, [0, 1], relu=False)
    assert tuple(got.shape) == (2, 2, 4, 4)
    a, g = hook_grads(model, x, "norm", nhwc, lambda out: out[:, [0, 1]])
    want = rule("gradcam", g, a[:, None])
    assert want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match=r"SwinTransformer also attends within windows.*use funcam.gradcam"):
        with torch.no_grad():
            funcam.chefer_relevance(split, x, [0, 1])


def test_guided_backprop_of_a_gelu_network_is_refused(x):
    """The benchmark row once returned the plain gradient as "guided" for a GELU Swin: now a clear refusal."""
    model = tiny_tv_swin(v2=True)
    with pytest.raises(ValueError, match=r"guided backprop needs ReLU activations, but the forward of "
                                         r"SwinTransformer called none"):
        funcam.guided_backprop(model, x, [0])


def test_relevance_of_a_class_attention_model_warns_nothing(x):
    """CaiT: self-attention over the 4x4 patches, then class attention (the CLS token's query, untapped). Relevance
    is computed without a warning (pytest turns warnings into errors) and equals the oracle: Chefer et al.'s rule on
    the self-attention probabilities of the model's own forward (tests/_oracle.py), read out uniformly over the patch
    rows, which the class attention reads."""
    torch.manual_seed(0)
    model = timm.models.cait.Cait(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, depth_token_only=1,
                                  num_classes=5).eval()
    fill_zeros(model)
    with torch.no_grad():
        maps = funcam.chefer_relevance(model, x, [0, 1])  # pytest turns warnings into errors
    assert maps.shape == (2, 2, 4, 4)
    # the numbers in float64 with layer scales of 1: timm's 1e-4 leaves the maps within 1e-15 of the uniform readout
    model, x = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
        got = funcam.chefer_relevance(model, x, [0, 1])
    probs, grads = attention_grads(model, x, [0, 1])
    assert [tuple(p.shape[-2:]) for p in probs] == [(16, 16), (1, 17)]  # self-attention, class attention
    readout = x.new_full((16,), 1 / 16)
    want = torch.stack([(readout @ relevance_matrix(probs[:1], gs[:1], "chefer")).reshape(2, 4, 4)
                        for gs in grads], dim=1)
    assert (want - 1 / 16).abs().amax() > 1e-9  # more than the uniform readout (observed 8e-8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # observed 3e-17


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
    for k in (0, 1):  # captum's GuidedBackprop on a copy (it hooks the model's ReLU modules)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # captum warns that it sets requires_grad and hooks
            want = GuidedBackprop(copy.deepcopy(model).requires_grad_(False)).attribute(x.clone(), target=k)
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(grads[:, k], want, atol=1e-8, rtol=1e-5)  # observed 3.5e-10
