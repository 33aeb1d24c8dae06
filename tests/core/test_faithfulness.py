"""funcam's pixel flipping, faithfulness estimate, monotonicity and sensitivity-n against Quantus 0.6 itself, per
(image, class) pair on the same maps; batched over B x K x steps equals Quantus' per-pair loop, whatever the chunks."""
from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, assert_parity, inputs, per_pair, quiet, random_maps, tiny_model, values

MODEL, X, MAPS = tiny_model(), inputs(), random_maps()


@pytest.fixture(autouse=True)
def trapz(monkeypatch):
    # numpy 2 removed np.trapz, which Quantus 0.6's calculate_auc still calls
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@pytest.mark.parametrize("baseline", ["black", "white", "mean", 0.25])
def test_pixel_flipping_equals_quantus(baseline):
    q = values(per_pair(quiet(quantus.PixelFlipping, features_in_step=24, perturb_baseline=baseline,
                              disable_warnings=True), MODEL, X, MAPS, CLASSES, softmax=True))
    f = metrics.pixel_flipping(MODEL, X, MAPS, CLASSES, features_in_step=24, perturb_baseline=baseline)
    assert f.shape == (2, 2, 3 * 12 * 12 // 24) and f.std() > 0
    assert_parity(f, q)


def test_pixel_flipping_auc_equals_quantus():
    q = values(per_pair(quiet(quantus.PixelFlipping, features_in_step=36, return_auc_per_sample=True,
                              disable_warnings=True), MODEL, X, MAPS, CLASSES, softmax=True))
    assert_parity(metrics.pixel_flipping(MODEL, X, MAPS, CLASSES, features_in_step=36, return_auc_per_sample=True), q)


def test_pixel_flipping_chunks_and_batch_equal_one_pair_at_a_time():
    whole = metrics.pixel_flipping(MODEL, X, MAPS, CLASSES, features_in_step=24)
    chunked = metrics.pixel_flipping(MODEL, X, MAPS, CLASSES, features_in_step=24, max_memory=1)  # one input a chunk
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    for b in range(2):
        for k in range(2):
            one = metrics.pixel_flipping(MODEL, X[b:b + 1], MAPS[b:b + 1, k:k + 1], CLASSES[b:b + 1, k:k + 1],
                                         features_in_step=24)
            torch.testing.assert_close(one[0, 0], whole[b, k], rtol=1e-5, atol=1e-6)


def test_pixel_flipping_upsamples_low_resolution_maps():
    low = random_maps(size=3)
    up = torch.nn.functional.interpolate(low, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(metrics.pixel_flipping(MODEL, X, low, CLASSES, features_in_step=36),
                               metrics.pixel_flipping(MODEL, X, up, CLASSES, features_in_step=36))


def test_faithfulness_estimate_equals_quantus():
    q = values(per_pair(quiet(quantus.FaithfulnessEstimate, features_in_step=24, disable_warnings=True), MODEL, X,
                        MAPS, CLASSES, softmax=False))
    f = metrics.faithfulness_estimate(MODEL, X, MAPS, CLASSES, features_in_step=24)
    assert f.shape == (2, 2) and f.abs().max() > 0
    assert_parity(f, q)


def test_monotonicity_equals_quantus_inserting_the_image():
    # Quantus 0.6 writes the baseline's own value into the all-baseline input: its score never changes, so it
    # returns True for every map. With a perturb_func that inserts x's features its loop is Arya et al.'s test.
    assert values(per_pair(quiet(quantus.Monotonicity, features_in_step=24, disable_warnings=True), MODEL, X, MAPS,
                           CLASSES, softmax=True)).all()
    out = []
    for b in range(2):
        flat = X[b:b + 1].numpy().reshape(1, -1)

        def insert(arr, indices, flat=flat, **kwargs):
            arr = arr.copy()
            arr[np.arange(len(arr))[:, None], indices] = flat[np.arange(len(arr))[:, None], indices]
            return arr

        out.append(values(per_pair(quiet(quantus.Monotonicity, features_in_step=24, perturb_func=insert,
                                         disable_warnings=True), MODEL, X[b:b + 1], MAPS[b:b + 1],
                                   CLASSES[b:b + 1], softmax=True))[0])
    f = metrics.monotonicity(MODEL, X, MAPS, CLASSES, features_in_step=24)
    assert f.dtype == torch.bool
    np.testing.assert_array_equal(f.numpy(), np.stack(out).astype(bool))


def test_monotonicity_true_for_a_monotone_model():
    # logit = sum of positive weights * x on x >= 0, black baseline 0: inserting any feature raises it
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 2, bias=False))
    with torch.no_grad():
        lin[1].weight.uniform_(0.1, 1.0, generator=torch.Generator().manual_seed(0))
    x = X.abs()
    x[:, :, 0, 0] = 0
    assert metrics.monotonicity(lin, x, MAPS, torch.tensor([0, 1]), features_in_step=12, softmax=False).all()


def test_sensitivity_n_equals_quantus_on_all_pairs_as_one_batch():
    xq = X.repeat_interleave(2, 0).numpy()
    q = np.array(quiet(quantus.SensitivityN(features_in_step=12, return_aggregate=False, disable_warnings=True),
                       model=MODEL, x_batch=xq, y_batch=CLASSES.reshape(-1).numpy(),
                       a_batch=MAPS.reshape(4, 1, 12, 12).numpy().astype(np.float64), softmax=True))
    f = metrics.sensitivity_n(MODEL, X, MAPS, CLASSES, features_in_step=12)
    assert f.shape == (int(0.8 * 144 // 12),)
    assert_parity(f, q)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="features_in_step"):
        metrics.pixel_flipping(MODEL, X, MAPS, CLASSES, features_in_step=0)
    with pytest.raises(ValueError, match="perturb_baseline"):
        metrics.pixel_flipping(MODEL, X, MAPS, CLASSES, perturb_baseline="grey")
    with pytest.raises(ValueError, match="classes"):
        metrics.faithfulness_estimate(MODEL, X, MAPS, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="maps"):
        metrics.pixel_flipping(MODEL, X, MAPS[:1], CLASSES)
