"""Explanation quality, batched over B images x K classes: localisation and faithfulness metrics.

Public names only; the implementation is in ``funcam._src.core.metrics``.
"""
from funcam._src.core.metrics import (
    ConfidenceChange,
    DeletionInsertion,
    boxes_to_masks,
    confidence_change,
    deletion_insertion,
    energy_in_box,
    impute,
    pointing_game,
    road,
)

__all__ = [
    "ConfidenceChange",
    "DeletionInsertion",
    "boxes_to_masks",
    "confidence_change",
    "deletion_insertion",
    "energy_in_box",
    "impute",
    "pointing_game",
    "road",
]
