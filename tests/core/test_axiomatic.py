"""funcam's completeness and non-sensitivity against Quantus 0.6 itself, and completeness on an analytic case."""
from __future__ import annotations

import numpy as np
import quantus
import torch

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, assert_parity, inputs, per_pair, quiet, random_maps, tiny_model, values

MODEL, X, MAPS = tiny_model(), inputs(size=6), random_maps(size=6)
# one image, 48 features: Quantus runs one forward per feature and pair
SMALL_X, SMALL_MAPS = inputs(size=4, batch=1), random_maps(size=4, batch=1)


def test_non_sensitivity_equals_quantus():
    q = values(per_pair(quiet(quantus.NonSensitivity, eps=0.02, disable_warnings=True), MODEL, SMALL_X, SMALL_MAPS,
                        CLASSES[:1], softmax=True, channel_first=True))
    f = metrics.non_sensitivity(MODEL, SMALL_X, SMALL_MAPS, CLASSES[:1], eps=0.02)
    assert f.dtype == torch.int64 and f.shape == (1, 2)
    assert_parity(f, q)


def test_non_sensitivity_steps_give_each_feature_its_steps_change():
    # features_in_step > 1 (Quantus 0.6 raises): a feature counts as insensitive when replacing its step is; a slow
    # loop over the steps as the reference
    f = metrics.non_sensitivity(MODEL, X, MAPS, CLASSES, eps=0.02, features_in_step=3)
    a = (MAPS / MAPS.abs().amax(dim=(2, 3), keepdim=True)).abs().unsqueeze(2).expand(2, 2, 3, 6, 6).reshape(2, 2, -1)
    with torch.no_grad():
        y = MODEL(X).softmax(-1).gather(1, CLASSES)
        ref = torch.zeros(2, 2, dtype=torch.long)
        for s in range(36):
            xp = X.flatten(1).clone()
            xp[:, 3 * s:3 * s + 3] = X.flatten(1).amin(dim=1, keepdim=True)
            flat = (MODEL(xp.view_as(X)).softmax(-1).gather(1, CLASSES) - y).abs() < 0.02
            ref += (flat.unsqueeze(-1) ^ (a[..., 3 * s:3 * s + 3] < 0.02)).sum(-1)
    torch.testing.assert_close(f, ref)


def test_completeness_equals_quantus_and_holds_for_a_linear_model():
    q = values(per_pair(quiet(quantus.Completeness, disable_warnings=True), MODEL, X, MAPS, CLASSES))
    np.testing.assert_array_equal(metrics.completeness(MODEL, X, MAPS, CLASSES).numpy(), q.astype(bool))
    # logit_k = w_k . x: y(x) - y(min(x) * 1) = sum_f w_kf (x_f - min x), a map per input feature (B, K, C, H, W)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 36, 5, bias=False)).double()
    x = X.double()
    w = lin[1].weight.detach().view(5, 3, 6, 6)
    maps = w[CLASSES] * (x - x.flatten(1).amin(dim=1).view(2, 1, 1, 1)).unsqueeze(1)
    assert metrics.completeness(lin, x, maps, CLASSES, normalise=False, rtol=1e-9).all()
    assert not metrics.completeness(lin, x, maps * 1.01, CLASSES, normalise=False, rtol=1e-9).any()
