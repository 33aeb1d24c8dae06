"""funcam's max-sensitivity, average sensitivity and local Lipschitz estimate against Quantus 0.6 itself on Quantus'
own numpy noise (numpy seeded per image, funcam given the same draws), with one explainer for both (a saliency
map); and funcam's default Grad-CAM explainer against a per-copy loop."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import quantus
import torch

from funcam import metrics
from tests.conftest import make_model, noised
from tests.core.quantus_oracle import (
    CLASSES,
    assert_parity,
    inputs,
    per_pair,
    quantus_saliency,
    quiet,
    saliency,
    tiny_model,
    values,
)

MODEL, X = tiny_model(), inputs()
MAPS = saliency(MODEL, X, CLASSES).detach()
S = 4


def _draws(sample) -> torch.Tensor:
    out = []
    for b in range(2):
        np.random.seed(7 + b)
        out.append(np.stack([sample() for _ in range(S)]).reshape(S, 3, 12, 12))
    return torch.tensor(np.stack(out, 1))


@pytest.mark.parametrize("name,cls,sample,options", [
    ("max_sensitivity", quantus.MaxSensitivity, lambda: np.random.uniform(-0.2, 0.2, size=(1, 432)), {}),
    ("avg_sensitivity", quantus.AvgSensitivity, lambda: np.random.uniform(-0.2, 0.2, size=(1, 432)), {}),
    ("avg_sensitivity", quantus.AvgSensitivity, lambda: np.random.uniform(0.1, 0.3, size=(1, 432)),
     {"lower_bound": 0.1, "upper_bound": 0.3, "normalise": True}),
    ("local_lipschitz_estimate", quantus.LocalLipschitzEstimate, lambda: np.random.normal(0, 0.1, size=(1, 432)), {}),
])
def test_robustness_equals_quantus_on_its_draws(name, cls, sample, options):
    q = values(per_pair(quiet(cls, nr_samples=S, return_aggregate=False, disable_warnings=True, **options), MODEL, X,
                        MAPS, CLASSES, seed=7, explain_func=quantus_saliency))
    f = getattr(metrics, name)(MODEL, X, MAPS, CLASSES, nr_samples=S, draws=_draws(sample), explain_fn=saliency,
                               **options)
    assert (f > 0).all()
    assert_parity(f, q)


def test_prediction_changes_give_nan_as_quantus():
    sample = lambda: np.random.uniform(-3.0, 3.0, size=(1, 432))  # noqa: E731 - large enough to flip predictions
    q = values(per_pair(quiet(quantus.MaxSensitivity, nr_samples=S, lower_bound=3.0, return_aggregate=False,
                              return_nan_when_prediction_changes=True, disable_warnings=True), MODEL, X, MAPS,
                        CLASSES, seed=7, explain_func=quantus_saliency))
    f = metrics.max_sensitivity(MODEL, X, MAPS, CLASSES, nr_samples=S, lower_bound=3.0, draws=_draws(sample),
                                explain_fn=saliency, return_nan_when_prediction_changes=True)
    assert np.isnan(q).any()
    assert_parity(f, q)


@pytest.mark.slow  # resnet18 Grad-CAM on 2 x 3 copies, one image a chunk, and the loop
def test_default_grad_cam_explainer_batches_all_copies_like_a_loop():
    model = noised(copy.deepcopy(make_model("resnet18")))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cls = torch.tensor([1, 3])
    maps = metrics.gradcam_explainer(model, x, cls.expand(2, 2))
    draws = 0.05 * torch.randn(3, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    f = metrics.avg_sensitivity(model, x, maps, cls, nr_samples=3, draws=draws, max_memory=1)  # one image a call
    up = lambda m: torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear")  # noqa: E731
    a = up(maps).flatten(2)
    ref = torch.stack([(a - up(metrics.gradcam_explainer(model, x + d, cls.expand(2, 2))).flatten(2)).norm(dim=-1)
                       / a.norm(dim=-1) for d in draws]).mean(0)
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-6)
