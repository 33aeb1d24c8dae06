"""Occlusion (core/occlusion.py) against captum 0.9's Occlusion per class on the same float64 model and inputs;
against Input x Gradient on a linear model (1-element windows: the drop is w_k x exactly); batched K against a
per-class loop, chunked against unchunked, a batch against its images, compiled against eager."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

import funcam
from funcam._src.core.occlusion import memberships
from tests.conftest import make_input, make_model, noised

CLASSES = torch.tensor([[1, 3, 7], [2, 3, 0]])  # per image, K = 3


@pytest.fixture(scope="module")
def model():
    return noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))


@pytest.fixture(scope="module")
def x():
    # 16 px: captum's occlusion is K * P forwards; resnet18's last stage is still 1 x 1
    return make_input("resnet18", dtype=torch.float64)[..., ::4, ::4].contiguous()  # (2, 3, 16, 16)


def captum_per_class(forward, x, classes=CLASSES, **kwargs) -> torch.Tensor:
    """captum's Occlusion (B, K, C, H, W): one call per column of ``classes``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        occ = Occlusion(forward)
        with torch.no_grad():
            return torch.stack([occ.attribute(x, target=classes[:, k], perturbations_per_eval=64, **kwargs)
                                for k in range(classes.shape[1])], dim=1)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-10) -> None:
    assert bool((want != 0).any()), "all-zero reference"
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rel, f"relative error {err:.2e} > {rel}"


@pytest.mark.parametrize("size,window,stride", [(6, 6, 1), (7, 3, 2), (32, 8, 3), (5, 1, 1), (10, 4, 4)])
def test_memberships_are_captums_windows(size, window, stride):
    got = memberships(size, window, stride, torch.zeros((), dtype=torch.float64))
    n = -(-(size - window) // stride) + 1  # captum: ceil((D - window) / stride) + 1
    want = torch.zeros(n, size, dtype=torch.float64)
    for i in range(n):
        want[i, i * stride:i * stride + window] = 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("opts,theirs", [
    ({"sliding_window_shapes": 4, "strides": 2}, {"sliding_window_shapes": (3, 4, 4), "strides": (1, 2, 2)}),
    # windows cut at the edge (16 = 3 * 4 + 4 and 2 * 5 + 6), one channel at a time, a scalar baseline
    ({"sliding_window_shapes": (1, 5, 6), "strides": (1, 4, 5), "baselines": 0.5},
     {"sliding_window_shapes": (1, 5, 6), "strides": (1, 4, 5), "baselines": 0.5}),
    ({"sliding_window_shapes": (6, 6), "strides": 6}, {"sliding_window_shapes": (3, 6, 6), "strides": (1, 6, 6)}),
])
def test_occlusion_equals_captum(model, x, opts, theirs):
    want = captum_per_class(model, x, **theirs)
    assert want.dtype == torch.float32  # captum sums in float64 and casts its last division to float32
    assert_rel_close(funcam.occlusion(model, x, CLASSES, **opts), want.double(), 1e-6)


def test_a_tensor_baseline_and_a_score_callable_equal_captum(model, x):
    base = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    want = captum_per_class(lambda t: model(t).softmax(-1), x, sliding_window_shapes=(3, 6, 6), strides=(1, 5, 5),
                            baselines=base)
    got = funcam.cam(model, x, lambda out: out.softmax(-1).gather(1, CLASSES), method="occlusion",
                     sliding_window_shapes=6, strides=5, baselines=base)
    assert got.classes is None
    assert_rel_close(got.maps, want.double(), 1e-6)


def test_one_element_windows_on_a_linear_model_are_input_x_gradient():
    # s_k(x) - s_k(x with element i zeroed) = W[k, i] x_i exactly, and each element is covered once
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, 4)).double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    got = funcam.occlusion(lin, x, [0, 2, 3], sliding_window_shapes=(1, 1, 1), strides=1)
    want = x.unsqueeze(1) * lin[1].weight[[0, 2, 3]].detach().view(1, 3, 3, 6, 5)
    assert_rel_close(got, want, 1e-12)


def test_batched_classes_equal_a_per_class_loop_and_chunks(model, x):
    opts = {"sliding_window_shapes": 6, "strides": 5}
    with torch.no_grad():
        full = funcam.cam(model, x, CLASSES, method="occlusion", max_memory=2**40, **opts)
        assert torch.equal(full.classes, CLASSES)
        for k in range(CLASSES.shape[1]):
            one = funcam.cam(model, x, CLASSES[:, k:k + 1], method="occlusion", **opts)
            assert_rel_close(one.maps, full.maps[:, k:k + 1], 1e-12)
            torch.testing.assert_close(one.logits, full.logits, rtol=0, atol=0)
        # max_memory=1: one window position per forward
        assert_rel_close(funcam.cam(model, x, CLASSES, method="occlusion", max_memory=1, **opts).maps, full.maps,
                         1e-12)
        for i in range(x.shape[0]):
            one = funcam.cam(model, x[i:i + 1], CLASSES[i:i + 1], method="occlusion", **opts).maps
            assert_rel_close(one, full.maps[i:i + 1], 1e-12)


def test_maps_carry_no_graph_and_top_k_comes_from_x(model, x):
    out = funcam.cam(model, x, top_k=2, method="occlusion", sliding_window_shapes=8,
                     strides=8)
    with torch.no_grad():
        logits = model(x)
    assert not out.maps.requires_grad
    torch.testing.assert_close(out.logits.detach(), logits)
    assert torch.equal(out.classes, logits.topk(2).indices)
    assert funcam.occlusion(model, x, []).shape == (2, 0, 3, 16, 16)


@pytest.mark.slow  # a full trace of the occlusion loop: about 15 s
def test_fullgraph_aot_eager_equals_eager(model, x):
    torch._dynamo.reset()
    fn = torch.compile(lambda t, c: funcam.occlusion(model, t, c, sliding_window_shapes=8, strides=4),
                       fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_rel_close(fn(x, CLASSES), funcam.occlusion(model, x, CLASSES, sliding_window_shapes=8, strides=4),
                         1e-12)


@pytest.mark.parametrize("opts,exc,match", [
    ({"sliding_window_shapes": 0}, ValueError, r"sliding_window_shapes must be a positive int k .*got 0"),
    ({"sliding_window_shapes": (4, 4, 4, 4)}, ValueError, r"sliding_window_shapes must be .*got \(4, 4, 4, 4\)"),
    ({"strides": 1.5}, ValueError, r"strides must be a positive int k .*got 1.5"),
    ({"sliding_window_shapes": 17}, ValueError, r"must fit in x's \(C, H, W\) = \(3, 16, 16\), got \(3, 17, 17\)"),
    ({"sliding_window_shapes": (4, 4, 4)}, ValueError, r"must fit in x's .*got \(4, 4, 4\)"),
    ({"sliding_window_shapes": 4, "strides": 5}, ValueError, r"strides must not exceed sliding_window_shapes"),
    ({"baselines": torch.zeros(2, 3, 5, 5)}, ValueError, r"baselines must broadcast to x's shape"),
    ({"baselines": "grey"}, TypeError, "baselines must be None"),
])
def test_bad_options_name_themselves(model, x, opts, exc, match):
    with pytest.raises(exc, match=match):
        funcam.occlusion(model, x, [1], **opts)
