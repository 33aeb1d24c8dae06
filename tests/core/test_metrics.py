"""funcam.metrics against plain per-image, per-class loops and pytorch-grad-cam's metrics on the same inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from funcam.metrics import (
    boxes_to_masks,
    confidence_change,
    deletion_insertion,
    energy_in_box,
    impute,
    pointing_game,
    road,
)


def tiny_model(c: int = 3, n: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, n)).eval()


def data(b: int = 3, k: int = 2, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, s, s, generator=g)
    maps = torch.randn(b, k, s, s, generator=g)
    classes = torch.randint(0, 5, (b, k), generator=g)
    return x, maps, classes


def test_boxes_to_masks_loop():
    boxes = torch.tensor([[[1, 2, 4, 5], [0, 0, 8, 1]]])
    m = boxes_to_masks(boxes, (6, 8))
    ref = torch.zeros(1, 2, 6, 8, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes[0].tolist()):
        ref[0, k, y0:y1, x0:x1] = True
    assert torch.equal(m, ref)


@pytest.mark.parametrize("tol", [0, 1, 2.5])
def test_pointing_game_loop(tol):
    x, maps, _ = data(b=4, k=3)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 3, 16, 16, generator=g) > 0.97
    got = pointing_game(maps, masks, tolerance=tol)
    for b in range(4):
        for k in range(3):
            m = maps[b, k]
            py, px = divmod(int(m.argmax()), 16)
            ys, xs = torch.nonzero(masks[b, k], as_tuple=True)
            d = ((ys - py) ** 2 + (xs - px) ** 2).float().sqrt()
            assert bool(got[b, k]) == bool((d <= tol).any())
    assert got.any() and not got.all()


def test_pointing_game_boxes_equal_masks_and_constant_map_misses():
    _, maps, _ = data(b=2, k=2)
    boxes = torch.tensor([[[0, 0, 8, 8], [4, 4, 16, 16]], [[2, 3, 9, 12], [0, 0, 16, 16]]])
    assert torch.equal(pointing_game(maps, boxes), pointing_game(maps, boxes_to_masks(boxes, 16)))
    flat = torch.zeros(1, 1, 16, 16)
    assert not pointing_game(flat, torch.ones(1, 1, 16, 16, dtype=torch.bool)).any()


def test_energy_in_box_loop():
    _, maps, _ = data(b=3, k=2)
    boxes = torch.tensor([[[0, 0, 8, 8], [4, 4, 16, 16]]] * 3)
    got = energy_in_box(maps, boxes)
    for b in range(3):
        for k in range(2):
            x0, y0, x1, y1 = boxes[b, k].tolist()
            pos = maps[b, k].clamp_min(0)
            assert torch.allclose(got[b, k], pos[y0:y1, x0:x1].sum() / pos.sum())
    assert energy_in_box(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.bool)).item() == 0


def test_errors_name_the_argument():
    _, maps, classes = data()
    with pytest.raises(ValueError, match="masks must be"):
        pointing_game(maps, torch.ones(3, 2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, torch.ones_like(maps, dtype=torch.bool), tolerance=-1)
    with pytest.raises(ValueError, match="maps must be a floating"):
        energy_in_box(maps[0], torch.ones_like(maps, dtype=torch.bool))
    with pytest.raises(ValueError, match="boxes must be"):
        boxes_to_masks(torch.zeros(2, 3), 8)
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"funcam.upsample\(maps"):
        confidence_change(tiny_model(), x, maps, classes)
    x = torch.randn(3, 3, 16, 16)
    with pytest.raises(ValueError, match="classes must give K = 2"):
        deletion_insertion(tiny_model(), x, maps, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="order must be"):
        road(tiny_model(), x, maps, classes, order="best")
    with pytest.raises(ValueError, match="score must be"):
        road(tiny_model(), x, maps, classes, score="prob")
    with pytest.raises(ValueError, match="percentiles"):
        road(tiny_model(), x, maps, classes, percentiles=[120])


def test_confidence_change_loop_and_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.cam_mult_image import (
        CamMultImageConfidenceChange,
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = tiny_model()
    x, maps, classes = data()
    maps = maps.abs()  # some maps raise the score, some lower it
    got = confidence_change(model, x, maps, classes, chunk_size=4)
    norm = (maps - maps.amin((2, 3), keepdim=True)) / (maps.amax((2, 3), keepdim=True)
                                                       - maps.amin((2, 3), keepdim=True) + 1e-7)
    for k in range(2):
        targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, k]]
        cams = norm[:, k].numpy()
        ref = CamMultImageConfidenceChange()(x, cams, targets, model)
        assert np.allclose(got.change[:, k].numpy(), ref, atol=1e-6)
        y = model(x).softmax(-1).gather(1, classes[:, k:k + 1])[:, 0].detach()
        drop = DropInConfidence()(x, cams, targets, model)
        assert np.allclose((got.drop[:, k] * y).numpy(), drop, atol=1e-6)
        assert np.array_equal(got.increase[:, k].numpy(), IncreaseInConfidence()(x, cams, targets, model) > 0)
    assert got.change.abs().min() > 0


def test_deletion_insertion_loop():
    model = tiny_model()
    x, maps, classes = data(b=2, k=2)
    steps = 4
    got = deletion_insertion(model, x, maps, classes, steps=steps, baseline=("zero", "mean"), chunk_size=5)
    hw = 16 * 16
    for b in range(2):
        for k in range(2):
            order = maps[b, k].flatten().argsort(descending=True, stable=True)
            for t in range(steps + 1):
                chosen = torch.zeros(hw, dtype=torch.bool)
                chosen[order[: t * hw // steps]] = True
                chosen = chosen.view(1, 16, 16)
                dele = torch.where(chosen, 0.0, x[b])
                ins = torch.where(chosen, x[b], x[b].mean(dim=(1, 2), keepdim=True))
                c = int(classes[b, k])
                with torch.no_grad():
                    assert torch.allclose(got.deletion[b, k, t], model(dele[None]).softmax(-1)[0, c], atol=1e-6)
                    assert torch.allclose(got.insertion[b, k, t], model(ins[None]).softmax(-1)[0, c], atol=1e-6)
            curve = got.deletion[b, k]
            assert torch.allclose(got.deletion_auc[b, k], torch.trapezoid(curve, dx=1 / steps), atol=1e-6)
    # deletion starts and insertion ends at the clean image
    with torch.no_grad():
        clean = model(x).softmax(-1).gather(1, classes)
    assert torch.allclose(got.deletion[..., 0], clean, atol=1e-6)
    assert torch.allclose(got.insertion[..., -1], clean, atol=1e-6)


def test_deletion_blur_baseline_runs_batched_equal_single():
    model = tiny_model()
    x, maps, classes = data(b=2, k=1)
    both = deletion_insertion(model, x, maps, classes, steps=3)
    one = deletion_insertion(model, x[1:], maps[1:], classes[1:], steps=3)
    assert torch.allclose(both.insertion[1:], one.insertion, atol=1e-6)


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # inside pytorch-grad-cam
def test_impute_equals_pytorch_grad_cam_sparse_solve():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 24, generator=g)
    keep = torch.rand(2, 20, 24, generator=g) < torch.tensor([0.3, 0.8]).view(2, 1, 1)
    got = impute(x, ~keep)
    for i in range(2):
        ref = NoisyLinearImputer(noise=0)(x[i], keep[i].float())
        assert torch.allclose(got[i], ref, atol=1e-5)
    assert torch.equal(got[keep.unsqueeze(1).expand_as(x)], x[keep.unsqueeze(1).expand_as(x)])


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # inside pytorch-grad-cam
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_equals_pytorch_grad_cam(order):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = tiny_model()
    x, maps, classes = data(b=2, k=2)
    maps = maps.sigmoid()  # pytorch-grad-cam thresholds maps in [0, 1]; distinct values, no ties
    pct = (20, 50, 80)
    got = road(model, x, maps, classes, percentiles=pct, order=order, noise=0.0, chunk_size=3)
    cls = ROADMostRelevantFirst if order == "morf" else ROADLeastRelevantFirst
    for k in range(2):
        targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, k]]
        for j, p in enumerate(pct):
            metric = cls(percentile=100 - p)  # its percentile is the share kept
            metric.perturbation.imputer.noise = 0.0
            ref = metric(x, maps[:, k].numpy(), targets, model)
            assert np.allclose(got[:, k, j].numpy(), ref, atol=1e-5)
    assert got.abs().max() > 0


def test_road_noise_is_seeded_and_small():
    model = tiny_model()
    x, maps, classes = data(b=1, k=1)
    a = road(model, x, maps, classes, percentiles=(50,), generator=torch.Generator().manual_seed(3))
    b = road(model, x, maps, classes, percentiles=(50,), generator=torch.Generator().manual_seed(3))
    c = road(model, x, maps, classes, percentiles=(50,), noise=0.0)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=0.05)


def test_model_metrics_take_classes_shared_by_the_batch():
    # classes (K,) is expanded to (B, K) without a copy; ROAD once failed on that non-contiguous view
    model = tiny_model()
    x, maps, classes = data(b=2, k=2)
    shared = classes[0]
    per_image = shared.expand(2, -1).clone()
    for fn in (lambda c: road(model, x, maps, c, percentiles=(30, 70), noise=0.0),
               lambda c: deletion_insertion(model, x, maps, c, steps=4).deletion_auc,
               lambda c: confidence_change(model, x, maps, c).change):
        a, b = fn(shared.tolist()), fn(per_image)
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
