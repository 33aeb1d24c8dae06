"""Finer-CAM and the versus contrast (funcam/_src/core/contrast.py) against pytorch-grad-cam's FinerCAM on the same
layer and inputs in float64, and the versus contrast against Grad-CAM's linearity in the gradient."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import funcam
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_processed, quiet, rel_err

SIZE = (96, 96)  # the default cut: 3x3


@pytest.fixture(scope="module")
def setup(one_thread):
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x


def peer_finer(model, x, classes, **kw):
    """pytorch-grad-cam's FinerCAM once per class c (its target_idx; None: each image's top class): (B, K, H, W)."""
    from pytorch_grad_cam import FinerCAM
    out = []
    with quiet(), FinerCAM(model, [model.layer4]) as cam:
        for c in classes:
            out.append(cam(input_tensor=x, targets=None, target_idx=c, **kw))
    return torch.from_numpy(np.stack(out, 1))


@pytest.mark.parametrize("opts", [{}, {"alpha": 0.6, "comparison_categories": (1, 2)},
                                  {"comparison_categories": (2, 5)}], ids=["defaults", "alpha-two-ranks", "far-ranks"])
def test_equals_pytorch_grad_cam(setup, opts):
    model, x = setup
    peer_kw = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
    want = peer_finer(model, x, [1, 3], **peer_kw)
    out = funcam.cam(model, x, [1, 3], method="finercam", **opts)
    assert out.classes.tolist() == [[1, 3], [1, 3]] and bool((out.maps > 0).any())
    assert rel_err(pgc_processed(out.maps, SIZE), want) <= TOL
    top = funcam.cam(model, x, method="finercam", **opts)  # classes=None: each image's top class, as the peer's
    assert top.classes.tolist() == model(x).argmax(1, keepdim=True).tolist()
    assert rel_err(pgc_processed(top.maps, SIZE), peer_finer(model, x, [None], **peer_kw)) <= TOL


@pytest.mark.parametrize("general", [False, True], ids=["pooled", "general"])
def test_versus_is_the_difference_of_grad_cams_and_classes_at_once_equal_a_loop(setup, general):
    model, x = setup
    sp = funcam.split(model)._replace(pooled=None) if general else funcam.split(model)
    a, v = torch.tensor([[1, 3], [4, 1]]), torch.tensor([[5, 6], [1, 2]])
    got = funcam.finercam(sp, x, a, versus=v, alpha=0.7, relu=False)
    want = funcam.gradcam(sp, x, a, relu=False) - 0.7 * funcam.gradcam(sp, x, v, relu=False)
    assert bool((want != 0).any()) and rel_err(got, want) <= 1e-10
    both = funcam.finercam(sp, x, a, relu=False)
    loop = torch.cat([funcam.finercam(sp, x, a[:, k:k + 1], relu=False) for k in range(2)], dim=1)
    torch.testing.assert_close(loop, both, rtol=1e-10, atol=1e-12)


def test_bad_arguments(setup):
    model, x = setup
    with pytest.raises(ValueError, match="finercam contrasts classes of the model's logits"):
        funcam.finercam(model, x, lambda out: out[:, [1]])
    with pytest.raises(ValueError, match=r"versus must give one class per explained class.*\(2, 2\); got shape \(3,\)"):
        funcam.finercam(model, x, [1, 3], versus=[1, 2, 3])
    with pytest.raises(ValueError, match="comparison_categories must be a non-empty list of ranks"):
        funcam.finercam(model, x, [1], comparison_categories=[])
