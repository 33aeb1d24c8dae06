"""funcam's sparseness, complexity, effective complexity and discrete entropy against Quantus 0.6 / numpy / scipy."""
from __future__ import annotations

import numpy as np
import pytest
import quantus
import scipy.stats
import torch

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, assert_parity, inputs, per_pair, quiet, random_maps, tiny_model, values

MODEL, X, MAPS = tiny_model(), inputs(), random_maps()


@pytest.mark.parametrize("name,cls,options", [
    ("sparseness", quantus.Sparseness, {}),
    ("complexity", quantus.Complexity, {}),
    ("effective_complexity", quantus.EffectiveComplexity, {"eps": 0.3}),
    ("sparseness", quantus.Sparseness, {"abs": False, "normalise": False}),
])
def test_complexity_metrics_equal_quantus(name, cls, options):
    maps = MAPS.abs() if options.get("abs", True) is False else MAPS  # Quantus' Gini assumes non-negative values
    q = values(per_pair(quiet(cls, disable_warnings=True, **options), MODEL, X, maps, CLASSES))
    f = getattr(metrics, name)(MODEL, X, maps, CLASSES, **options)
    assert f.shape == (2, 2) and len(set(f.flatten().tolist())) > 1
    assert_parity(f, q)


def test_sparseness_of_a_single_peak_is_one_and_of_a_constant_map_zero():
    peak = torch.zeros(1, 2, 12, 12)
    peak[0, 0, 3, 4] = 5.0
    peak[0, 1] = 1.0
    s = metrics.sparseness(None, X[:1], peak)
    assert s[0, 0] > 0.99 and abs(float(s[0, 1])) < 1e-6


def test_complexity_model_free_and_low_resolution_maps_are_upsampled():
    low = random_maps(size=4)
    up = torch.nn.functional.interpolate(low, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(metrics.complexity(None, X, low), metrics.complexity(None, X, up))


def test_discrete_entropy_equals_numpy_histogram_and_scipy_entropy():
    r = np.random.RandomState(0)
    rows = np.concatenate([r.randn(8, 300), np.round(r.randn(4, 300) * 3) / 3, np.ones((1, 300))])
    ref = [scipy.stats.entropy(np.histogram(row, bins=100)[0]) for row in rows]
    np.testing.assert_allclose(metrics.discrete_entropy(torch.tensor(rows)).numpy(), ref, rtol=1e-12, atol=1e-12)
    ref = [scipy.stats.entropy(np.histogram(row, bins=17)[0]) for row in rows]
    np.testing.assert_allclose(metrics.discrete_entropy(torch.tensor(rows), 17).numpy(), ref, rtol=1e-12, atol=1e-12)
