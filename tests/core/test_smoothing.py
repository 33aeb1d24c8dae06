"""aug_smooth (funcam/_src/core/smoothing.py): pytorch-grad-cam's test-time augmentation with ttach's own
transforms as the oracle of the copies, and pytorch-grad-cam's ``aug_smooth=True`` output rebuilt from funcam's maps
of each copy (the peer scales each copy's map after resizing it, funcam before: the copies are compared one by
one, the average at feature resolution against the loop)."""
from __future__ import annotations

import copy

import pytest
import torch

import funcam
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_processed, pgc_run, rel_err

CLASSES = torch.tensor([[1, 3], [4, 1]])  # (B, K)
SIZE = (96, 96)  # the default cut: 3x3


@pytest.fixture(scope="module")
def setup(one_thread):
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x, funcam.split(model)


def ttach_copies():
    """pytorch-grad-cam's default transforms, from ttach itself."""
    import ttach as tta
    return list(tta.Compose([tta.HorizontalFlip(), tta.Multiply(factors=[0.9, 1, 1.1])]))


def loop(sp, x, classes, method, **opts):
    """The average of each copy's maps, min-max scaled per map, de-augmented by ttach: (B, K, h, w)."""
    total = 0
    copies = ttach_copies()
    for t in copies:
        maps = funcam.cam(sp, t.augment_image(x), classes, method=method, **opts).maps.detach()
        total = total + t.deaugment_mask(funcam.normalize(maps))
    return total / len(copies)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam", "ablationcam"])
def test_aug_smooth_is_the_average_over_ttachs_copies(setup, method):
    model, x, sp = setup
    got = funcam.cam(sp, x, CLASSES, method=method, aug_smooth=True)
    want = loop(sp, x, CLASSES, method)
    assert got.classes.tolist() == CLASSES.tolist() and bool((got.maps != 0).any())
    torch.testing.assert_close(got.maps, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.logits, model(x))  # the logits of x as given


@pytest.mark.slow  # 6 augmented copies per class: about 6 s
def test_top_k_and_score_callables_explain_the_classes_of_x_as_given(setup):
    model, x, sp = setup
    top = model(x).topk(2, dim=1).indices
    got = funcam.cam(sp, x, method="gradcam", top_k=2, aug_smooth=True)
    assert got.classes.tolist() == top.tolist()
    torch.testing.assert_close(got.maps, loop(sp, x, top, "gradcam"), rtol=1e-10, atol=1e-12)
    prob = lambda out: out.softmax(dim=1)[:, [2, 5]]  # one call per copy: the callable sees B images
    torch.testing.assert_close(funcam.gradcam(sp, x, prob, aug_smooth=True), loop(sp, x, prob, "gradcam"),
                               rtol=1e-10, atol=1e-12)


def test_each_copy_equals_pytorch_grad_cams_aug_smooth(setup):
    from pytorch_grad_cam import GradCAM
    model, x, sp = setup
    want = pgc_run(GradCAM, model, [model.layer4], x, CLASSES, aug_smooth=True)
    copies = ttach_copies()
    rebuilt = sum(t.deaugment_mask(pgc_processed(funcam.gradcam(sp, t.augment_image(x), CLASSES), SIZE))
                  for t in copies) / len(copies)
    assert rel_err(rebuilt, want) <= TOL
    assert not bool(torch.isnan(want).any()) and bool((want > 0).any())
