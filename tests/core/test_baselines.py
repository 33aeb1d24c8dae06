"""The model-free baselines: analytic Sobel and centre maps, and with_baselines equal to one call per map set."""
from __future__ import annotations

import pytest
import torch

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, inputs, random_maps, tiny_model

MODEL, X, MAPS = tiny_model(), inputs(), random_maps(size=3)


def test_sobel_map_of_a_vertical_step_is_its_edge():
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4:] = 1.0
    m = metrics.sobel_maps(None, x, [0, 1])
    assert m.shape == (1, 2, 8, 8) and torch.equal(m[0, 0], m[0, 1])
    torch.testing.assert_close(m[0, 0, :, 3:5], torch.full((8, 2), 4.0))  # |[1 2 1] x [1 0 -1]| across the step
    assert not m[0, 0, :, :3].any() and not m[0, 0, :, 5:].any()


def test_centre_map_peaks_at_the_centre_and_random_maps_follow_the_generator():
    c = metrics.centre_maps(None, X, CLASSES)
    assert c.shape == (2, 2, 12, 12) and c[0, 0, 5:7, 5:7].min() == c.max()
    r = metrics.random_maps(None, X, CLASSES, generator=torch.Generator().manual_seed(0))
    assert r.shape == (2, 2, 7, 7)
    assert torch.equal(r, metrics.random_maps(None, X, CLASSES, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("metric,options", [(metrics.pixel_flipping, {"features_in_step": 48}),
                                            (metrics.sparseness, {}),
                                            (metrics.region_perturbation, {"patch_size": 4, "regions_evaluation": 3})])
def test_with_baselines_equals_one_call_per_map_set(metric, options):
    out = metrics.with_baselines(metric, MODEL, X, MAPS, CLASSES, baseline_generator=torch.Generator().manual_seed(0),
                                 **options)
    assert list(out) == ["maps", "random", "centre", "sobel"]
    torch.testing.assert_close(out["maps"], metric(MODEL, X, MAPS, CLASSES, **options), rtol=1e-5, atol=1e-6)
    rand = metrics.random_maps(None, X, CLASSES, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["random"], metric(MODEL, X, rand, CLASSES, **options), rtol=1e-5, atol=1e-6)
    sob = metrics.sobel_maps(None, X, CLASSES)
    torch.testing.assert_close(out["sobel"], metric(MODEL, X, sob, CLASSES, **options), rtol=1e-5, atol=1e-6)


def test_with_baselines_refuses_a_metric_across_pairs():
    with pytest.raises(ValueError, match="cannot be split"):
        metrics.with_baselines(metrics.sensitivity_n, MODEL, X, MAPS, CLASSES, features_in_step=48)
