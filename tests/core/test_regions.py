"""funcam's region perturbation, selectivity, IROF and infidelity against Quantus 0.6 itself, per (image, class)."""
from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from quantus.functions.perturb_func import baseline_replacement_by_mask

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, assert_parity, inputs, per_pair, quiet, random_maps, tiny_model, values

MODEL, X, MAPS = tiny_model(), inputs(), random_maps()


@pytest.fixture(autouse=True)
def trapz(monkeypatch):
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)  # numpy 2 removed it; Quantus 0.6 calls it


@pytest.mark.parametrize("patch_size,order", [(4, "morf"), (4, "lerf"), (5, "morf")])  # 5: padded 2 / 1 + 3 blocks
def test_region_perturbation_equals_quantus(patch_size, order):
    q = values(per_pair(quiet(quantus.RegionPerturbation, patch_size=patch_size, order=order, regions_evaluation=5,
                              disable_warnings=True), MODEL, X, MAPS, CLASSES, softmax=True))
    f = metrics.region_perturbation(MODEL, X, MAPS, CLASSES, patch_size=patch_size, order=order, regions_evaluation=5)
    assert f.shape == (2, 2, 5) and f.abs().max() > 0
    assert_parity(f, q)


def test_region_perturbation_random_order_draws_a_permutation():
    g = torch.Generator().manual_seed(0)
    f = metrics.region_perturbation(MODEL, X, MAPS, CLASSES, patch_size=4, order="random", generator=g)
    again = metrics.region_perturbation(MODEL, X, MAPS, CLASSES, patch_size=4, order="random",
                                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(f, again)
    # all 9 patches gone at the end, whatever the order: the last step equals MoRF's last step
    morf = metrics.region_perturbation(MODEL, X, MAPS, CLASSES, patch_size=4, order="morf")
    torch.testing.assert_close(f[..., -1], morf[..., -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patch_size", [4, 5])
def test_selectivity_equals_quantus(patch_size):
    q = values(per_pair(quiet(quantus.Selectivity, patch_size=patch_size, disable_warnings=True), MODEL, X, MAPS,
                        CLASSES, softmax=True))
    assert_parity(metrics.selectivity(MODEL, X, MAPS, CLASSES, patch_size=patch_size), q)


@pytest.mark.slow  # about 120 superpixels: 480 Quantus steps
def test_irof_equals_quantus_single_channel():
    model, x, maps = tiny_model(channels=1), torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), \
        random_maps(size=32)
    q = values(per_pair(quiet(quantus.IROF, return_aggregate=False, disable_warnings=True), model, x, maps, CLASSES,
                        softmax=True))
    f = metrics.irof(model, x, maps, CLASSES)
    assert f.shape == (2, 2)
    assert_parity(f, q)


def test_irof_equals_quantus_rgb_with_segments_of_different_counts():
    # Quantus 0.6's IROF masks (B, 1, H, W) against (B, C, H, W) inputs and fails for C > 1: its perturb_func is
    # given the mask broadcast over channels, its own baseline_replacement_by_mask otherwise
    x, maps = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), random_maps(size=32)
    seg = metrics.superpixels(x)
    assert seg[0].max() != seg[1].max()  # 10 and 6 segments: the shorter curve must not borrow the longer's steps

    def broadcast(arr, mask, **kwargs):
        return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)

    q = values(per_pair(quiet(quantus.IROF, return_aggregate=False, perturb_func=broadcast, disable_warnings=True),
                        MODEL, x, maps, CLASSES, softmax=True))
    assert_parity(metrics.irof(MODEL, x, maps, CLASSES), q)
    torch.testing.assert_close(metrics.irof(MODEL, x, maps, CLASSES, segments=seg), metrics.irof(MODEL, x, maps,
                                                                                                 CLASSES))


def test_infidelity_equals_quantus():
    q = values(per_pair(quiet(quantus.Infidelity, perturb_patch_sizes=[4, 6], n_perturb_samples=2,
                              disable_warnings=True), MODEL, X, MAPS, CLASSES, softmax=False))
    f = metrics.infidelity(MODEL, X, MAPS, CLASSES, perturb_patch_sizes=[4, 6], n_perturb_samples=2)
    assert (f > 0).all()
    assert_parity(f, q)


def test_infidelity_scores_k_classes_from_one_input_per_image_and_step():
    seen = []

    def counting(x):
        seen.append(x.shape[0])
        return MODEL(x)

    metrics.infidelity(counting, X, MAPS, CLASSES, perturb_patch_sizes=[4])
    assert sum(seen) == 2 + 2 * 9  # the clean batch, then B x 9 patches (not B x K x 9)
