"""funcam's localisation metrics against Quantus 0.6 itself, and the existing pointing game / energy in box against
Quantus' PointingGame / RelevanceMassAccuracy where the definitions agree."""
from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, assert_parity, inputs, per_pair, quiet, random_maps, tiny_model, values

MODEL, X, MAPS = tiny_model(), inputs(), random_maps()
MASKS = torch.rand(2, 2, 12, 12, generator=torch.Generator().manual_seed(2)) > 0.6


@pytest.mark.parametrize("name,cls,options", [
    ("attribution_localisation", quantus.AttributionLocalisation, {}),
    ("attribution_localisation", quantus.AttributionLocalisation, {"positive_attributions": True, "abs": False}),
    ("relevance_mass_accuracy", quantus.RelevanceMassAccuracy, {}),
    ("relevance_rank_accuracy", quantus.RelevanceRankAccuracy, {}),
    ("top_k_intersection", quantus.TopKIntersection, {"k": 20}),
    ("top_k_intersection", quantus.TopKIntersection, {"k": 20, "concept_influence": True}),
    ("auc", quantus.AUC, {}),
])
def test_localisation_metrics_equal_quantus(name, cls, options):
    q = values(per_pair(quiet(cls, disable_warnings=True, **options), MODEL, X, MAPS, CLASSES, masks=MASKS))
    f = getattr(metrics, name)(MODEL, X, MAPS, CLASSES, masks=MASKS, **options)
    assert f.shape == (2, 2) and len(set(f.flatten().tolist())) > 1
    assert_parity(f, q)


def test_masks_per_image_and_boxes_broadcast_and_empty_masks_give_nan():
    per_image = MASKS[:, 0]
    torch.testing.assert_close(metrics.auc(MODEL, X, MAPS, CLASSES, masks=per_image),
                               metrics.auc(MODEL, X, MAPS, CLASSES, masks=per_image[:, None].expand(2, 2, 12, 12)))
    boxes = torch.tensor([[[2, 3, 8, 9], [0, 0, 12, 6]], [[5, 5, 6, 6], [0, 0, 0, 0]]])
    out = metrics.relevance_rank_accuracy(MODEL, X, MAPS, CLASSES, masks=boxes)
    assert torch.isnan(out[1, 1]) and not torch.isnan(out[:, 0]).any()
    torch.testing.assert_close(out, metrics.relevance_rank_accuracy(MODEL, X, MAPS, CLASSES,
                                                                   masks=metrics.boxes_to_masks(boxes, 12)),
                               equal_nan=True)


def test_pointing_game_equals_quantus_where_the_maximum_is_unique():
    # Quantus counts a hit when any of the tied maxima lies in the mask (a constant map: every pixel); funcam's
    # pointing game takes the first maximum (a constant map is a miss) and has a tolerance: unique maxima agree
    q = values(per_pair(quiet(quantus.PointingGame, disable_warnings=True), MODEL, X, MAPS, CLASSES, masks=MASKS))
    np.testing.assert_array_equal(metrics.pointing_game(MAPS, MASKS).numpy(), q.astype(bool))


def test_energy_in_box_equals_relevance_mass_accuracy_of_non_negative_maps():
    pos = MAPS.clamp_min(0)
    q = values(per_pair(quiet(quantus.RelevanceMassAccuracy, disable_warnings=True), MODEL, X, pos, CLASSES,
                        masks=MASKS))
    assert_parity(metrics.energy_in_box(pos, MASKS), q)


def test_bad_masks_raise():
    with pytest.raises(ValueError, match="masks"):
        metrics.auc(MODEL, X, MAPS, CLASSES, masks=MASKS[:, :, :5])
    with pytest.raises(ValueError, match="k must be smaller"):
        metrics.top_k_intersection(MODEL, X, MAPS, CLASSES, masks=MASKS, k=144)
