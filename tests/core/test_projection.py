"""Eigen-CAM, EigenGrad-CAM and eigen_smooth (funcam/_src/core/projection.py) against pytorch-grad-cam's EigenCAM,
EigenGradCAM, ``get_2d_projection`` and its CAMs with ``eigen_smooth=True``, in float64.

pytorch-grad-cam's projections take LAPACK's sign, funcam's the sign that correlates with the channel mean of the
projected terms: the raw maps are compared after funcam's sign rule is applied to the peer's, the full outputs after
the peer's post-processing of funcam's map with the peer's sign."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import funcam
from funcam._src.core.projection import first_component, weighted_maps
from funcam._src.core.request import parse
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_processed, pgc_run, quiet, rel_err

CLASSES = torch.tensor([[1, 3], [4, 1]])  # (B, K)
SIZE = (96, 96)  # layer4: 3x3


@pytest.fixture(scope="module")
def setup(one_thread):
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x


@pytest.fixture(scope="module")
def layer3(setup):
    return funcam.split(setup[0], "layer3")  # 6x6: a projection of 36 positions; captured once for the module


def peer_projection(terms: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's get_2d_projection of terms (N, C, h, w) -> (N, h, w), its own sign."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    return torch.from_numpy(get_2d_projection(terms.detach().numpy()).astype(np.float64))


def signed_like(peer: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """funcam's sign rule applied to the peer's maps (N, h, w): correlate with the channel mean of the terms."""
    dot = (peer * terms.detach().mean(dim=1)).flatten(1).sum(dim=1)
    return peer * torch.where(dot < 0, -1.0, 1.0).to(peer.dtype)[:, None, None]


def test_first_component_is_get_2d_projection_with_the_sign_rule():
    t = torch.randn(5, 7, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.3
    got = first_component(t)
    assert got.shape == (5, 4, 6) and rel_err(got, signed_like(peer_projection(t), t)) <= TOL
    assert bool(((got * t.mean(dim=1)).flatten(1).sum(dim=1) >= 0).all())  # the rule itself



def test_non_finite_terms_give_nan_maps_and_leave_the_others_alone():
    # features that overflowed: LAPACK refuses a non-finite matrix; the image's map is NaN (the entry's finite check
    # then names it) and the other images' maps are what they are alone
    t = torch.randn(3, 7, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.3
    bad = t.clone()
    bad[1, 2, 0, 0] = float("inf")
    got = first_component(bad)
    assert bool(got[1].isnan().all())
    torch.testing.assert_close(got[[0, 2]], first_component(t[[0, 2]]), rtol=0, atol=0)
    assert bool(got[0].abs().amax() > 0)


def test_eigencam_equals_pytorch_grad_cam(setup):
    from pytorch_grad_cam import EigenCAM
    model, x = setup
    sp = funcam.split(model)
    out = funcam.cam(sp, x, CLASSES, method="eigencam", relu=False)
    with torch.no_grad():
        a = sp.extract(x)
    raw = signed_like(peer_projection(a), a)
    assert out.classes.tolist() == CLASSES.tolist() and out.maps.shape == (2, 2, 3, 3)
    for k in range(2):  # class-agnostic: the same map for every class
        assert rel_err(out.maps[:, k], raw) <= TOL
    full = pgc_run(EigenCAM, model, [model.layer4], x, CLASSES)
    peer_sign = torch.sign((peer_projection(a) * raw).flatten(1).sum(1))[:, None, None, None]
    assert rel_err(pgc_processed((peer_sign * out.maps).clamp_min(0), SIZE), full) <= TOL


def _eigengrad_peer(model, x, classes):
    """pytorch-grad-cam's EigenGradCAM raw maps get_2d_projection(grads * activations) (B, K, h, w), per class, and
    the (grads * activations) terms it projected."""
    from pytorch_grad_cam import EigenGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    raw, terms = [], []
    with quiet(), EigenGradCAM(model=model, target_layers=[model.layer4]) as cam:
        for k in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
            cam(input_tensor=x, targets=targets)
            acts, grads = cam.activations_and_grads.activations[0], cam.activations_and_grads.gradients[0]
            raw.append(torch.from_numpy(cam.get_cam_image(x, model.layer4, targets, acts.numpy(), grads.numpy(),
                                                          False).astype(np.float64)))
            terms.append(acts * grads)
    return torch.stack(raw, 1), torch.stack(terms, 1)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "general"])
def test_eigengradcam_equals_pytorch_grad_cam(setup, pooled):
    model, x = setup
    sp = funcam.split(model) if pooled else funcam.split(model)._replace(pooled=None)
    got = funcam.eigengradcam(sp, x, CLASSES, relu=False)
    raw, terms = _eigengrad_peer(model, x, CLASSES)
    want = signed_like(raw.flatten(0, 1), terms.flatten(0, 1)).view_as(raw)
    assert got.shape == (2, 2, 3, 3) and rel_err(got, want) <= TOL
    loop = torch.cat([funcam.eigengradcam(sp, x, CLASSES[:, k:k + 1], relu=False) for k in range(2)], dim=1)
    torch.testing.assert_close(loop, got, rtol=1e-10, atol=1e-12)


def _pgc(method):
    import pytorch_grad_cam as p
    return {"gradcam": p.GradCAM, "gradcampp": p.GradCAMPlusPlus, "xgradcam": p.XGradCAM, "hirescam": p.HiResCAM,
            "layercam": p.LayerCAM, "elementwise": p.GradCAMElementWise}[method]


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise"])
def test_eigen_smooth_equals_pytorch_grad_cam(setup, layer3, method):
    model, x = setup
    sp = layer3
    got = funcam.cam(sp, x, CLASSES, method=method, relu=False, eigen_smooth=True).maps
    plain = funcam.cam(sp, x, CLASSES, method=method, relu=False).maps
    assert bool(((got * plain).flatten(2).sum(2) >= 0).all())  # the sign rule: with the channel sum of the terms
    want = pgc_run(_pgc(method), model, [model.layer3], x, CLASSES, eigen_smooth=True)
    # the peer's sign is LAPACK's, per image and class: one of the two signs of each funcam map gives its output
    ups = [pgc_processed((s * got).clamp_min(0), SIZE) for s in (1, -1)]
    closer = (ups[0] - want).abs().amax(dim=(2, 3)) <= (ups[1] - want).abs().amax(dim=(2, 3))
    pick = torch.where(closer[..., None, None], ups[0], ups[1])
    assert bool((got != 0).any()) and rel_err(pick, want) <= TOL


def test_eigen_smooth_of_channel_weights_is_the_projection_of_the_weighted_activations():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    a = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    terms = (w[..., None, None] * a[:, None]).flatten(0, 1)
    want = signed_like(peer_projection(terms), terms).view(2, 3, 4, 4)
    for opts in ({}, {"max_memory": 1}):  # one class at a time
        got = weighted_maps(w, a, parse(**opts)._replace(options={"eigen_smooth": True}))
        assert rel_err(got, want) <= TOL


def test_eigen_smooth_is_refused_where_the_map_is_not_a_sum_of_terms(setup):
    model, x = setup
    with pytest.raises(ValueError, match="eigen_smooth applies to maps that are a sum of per-channel terms"):
        funcam.argmax_channel(model, x, [1], eigen_smooth=True)
