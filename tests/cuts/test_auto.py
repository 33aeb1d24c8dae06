"""The graph route's first-use check (funcam/_src/cuts/auto.py): it refuses only structural zeros, judges the input
the model is explained on, and cuts at any named module, including one the capture folds away.

The fixed-weight net is captum's test model (tests/helpers/basic_models.py: BasicModel_ConvNet_One_Conv with its
weights); its biases (-50, -75) switch every unit off for small random inputs, so a random probe sees no gradient,
while the documented input ``arange(16)`` does. Oracle: captum's LayerGradCam on the same layer, and the analytic
Grad-CAM from the per-class autograd loop of tests/_oracle.py at the module's output (a forward hook)."""
from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

import funcam
from tests._oracle import hook_grads, nchw, rule
from tests.conftest import make_input, make_model, noised


class FixedConvNet(nn.Module):
    """conv 1->2 (3x3, weights 1, biases -50 and -75), ReLU, flatten, Linear 8->4 (+1 on the first five inputs, -1 on
    the last three, bias 0), ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.fill_(1)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.tensor([[1.0] * 5 + [-1.0] * 3] * 4))
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.relu2(self.fc1(self.relu1(self.conv1(x)).flatten(1)))


def _hook_gradcam(model: nn.Module, layer: str, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Grad-CAM before the ReLU, (B, K, h, w), from the module's output and gradients in the model's own forward."""
    a, g = hook_grads(model, x, layer, nchw, lambda out: out[:, classes])
    return rule("gradcam", g, a[:, None])


@pytest.mark.parametrize("layer", ["conv1", "relu1"])
@pytest.mark.parametrize("with_example", [False, True], ids=["first-use", "example"])
def test_a_data_dependent_zero_on_the_probe_is_not_refused(layer, with_example):
    model = FixedConvNet().eval()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    sp = funcam.split(model, layer, example=x if with_example else None)
    got = funcam.gradcam(sp, x, [0, 1], relu=False)
    loop = _hook_gradcam(model, layer, x, [0, 1])
    for k in (0, 1):
        want = LayerGradCam(model, getattr(model, layer)).attribute(x, target=k)[:, 0]
        torch.testing.assert_close(got[:, k], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[:, k], loop[:, k], rtol=1e-6, atol=1e-6)
    assert bool(got.any())
    if layer == "conv1":  # the numbers
        torch.testing.assert_close(got[0, 0], torch.tensor([[11.25, 13.5], [20.25, 22.5]]))


def test_a_zero_gradient_on_the_input_passed_is_a_zero_map_with_a_warning():
    model = FixedConvNet().eval()
    sp = funcam.split(model, "conv1", example=torch.arange(16.0).view(1, 1, 4, 4))
    dark = torch.zeros(1, 1, 4, 4)  # every unit off: the scores do not depend on conv1 for this input
    with pytest.warns(funcam.ZeroMapWarning, match="exactly zero on this input"):
        maps = funcam.gradcam(sp, dark, [0], relu=False)
    assert maps.shape == (1, 1, 2, 2) and not bool(maps.any())


def test_a_structural_zero_is_still_refused():
    """A head that reads the cut only through a product with zero: every input gives a zero gradient at every grid
    position (the structural zero the check exists for)."""

    class Ignores(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            a = self.conv(x)
            return self.fc(0 * a.mean((2, 3)) + x.mean((2, 3)).sum(1, keepdim=True))

    with pytest.raises(ValueError, match=r"'conv' is exactly zero at every grid position for every input tried"):
        funcam.split(Ignores().eval(), "conv", example=torch.randn(2, 3, 8, 8))


def test_zero_bias_is_not_blamed():
    model = FixedConvNet().eval()
    assert "fc1.bias" not in funcam._src.guard.zero_weights_hint(model)
    with torch.no_grad():
        model.fc1.weight.zero_()
    assert "fc1.weight" in funcam._src.guard.zero_weights_hint(model)


class WithIdentity(nn.Module):
    """A module whose cut is an ``nn.Identity`` (and an eval-mode Dropout): ``torch.export`` folds the identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.features = nn.Identity()
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(self.features(torch.relu(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("layer", ["features", "drop"])
def test_any_named_module_is_a_cut_identity_included(layer):
    torch.manual_seed(0)
    model = WithIdentity().eval().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    sp = funcam.split(model, layer)
    assert sp.layers == (layer,)
    got = funcam.gradcam(sp, x, [0, 2], relu=False)
    want = _hook_gradcam(model, layer, x, [0, 2])  # both modules return relu(conv(x))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert bool(got.any())


@pytest.mark.parametrize("name,identity,same", [
    ("resnet18", "layer4.1.drop_block", "layer4.1.bn1"),  # BasicBlock: bn1 -> drop_block (Identity) -> act1
    # pos_drop (Dropout, eval) -> patch_drop, norm_pre (Identity); a graph capture of its own (8 s): the slow set
    pytest.param("vit_tiny_patch16_224", "norm_pre", "pos_drop", marks=pytest.mark.slow),
])
def test_timm_identity_names_are_cuts(name, identity, same):
    """timm keeps ``nn.Identity`` in many named places: the cut is the value the identity returns, so its maps are
    those of the module before it."""
    model, x = noised(copy.deepcopy(make_model(name))), make_input(name)
    assert isinstance(model.get_submodule(identity), nn.Identity)
    got = funcam.gradcam(funcam.split(model, identity), x, [1, 3], relu=False)
    want = funcam.gradcam(funcam.split(model, same), x, [1, 3], relu=False)
    assert bool(want.any())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
