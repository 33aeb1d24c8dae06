"""FullGrad (funcam/_src/core/fullgrad.py) against pytorch-grad-cam's FullGrad in float64, on batch-norm biases
(timm resnet18) and convolution biases (torchvision vgg11), and K classes at once against one call per class."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import funcam
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_run, rel_err

CLASSES = torch.tensor([[1, 3], [4, 1]])  # (B, K)


def _vgg11():
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None, num_classes=10).to(torch.float64).eval()


@pytest.mark.parametrize("name", ["resnet18", pytest.param("vgg11", marks=pytest.mark.slow)])  # vgg11: 8 s
def test_equals_pytorch_grad_cam(name, one_thread):
    from pytorch_grad_cam import FullGrad
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64))) if name == "resnet18" else _vgg11()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = pgc_run(lambda model, target_layers: FullGrad(model, target_layers), model, [], x, CLASSES)
    got = funcam.fullgrad(model, x, CLASSES)
    assert got.shape == (2, 2, 32, 32) and bool((got > 0).any())
    assert rel_err(funcam.normalize(got), want) <= TOL


def test_classes_at_once_equal_one_call_per_class_and_chunks(one_thread):
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        both = funcam.cam(model, x, CLASSES, method="fullgrad")
        loop = torch.cat([funcam.fullgrad(model, x, CLASSES[:, k:k + 1]) for k in range(2)], dim=1)
        chunked = funcam.fullgrad(model, x, CLASSES, chunk_size=1)
    assert both.classes.tolist() == CLASSES.tolist() and bool((both.maps > 0).any())
    torch.testing.assert_close(loop, both.maps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked, both.maps, rtol=1e-10, atol=1e-12)


def test_a_model_without_biased_convolutions_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4)).double()
    with pytest.raises(ValueError, match="fullgrad needs Conv2d or BatchNorm2d layers with a bias"):
        funcam.fullgrad(model, torch.randn(1, 3, 4, 4, dtype=torch.float64), [1])
