"""Localisation against ground-truth masks, Quantus 0.6's definitions batched over B images x K classes:
attribution localisation, relevance mass accuracy, relevance rank accuracy, top-k intersection, AUC. No model
is run.

Each takes ``model, x (B, C, H, W), maps (B, K, h, w) or (B, K, C, H, W), classes`` like every metric (model and
classes unused) and ``masks``: ``(B, K, H, W)`` (one per map), ``(B, H, W)`` / ``(B, 1, H, W)`` (one per image)
or boxes ``(B, K, 4)`` (``funcam.metrics.boxes_to_masks``). Returns ``(B, K)``, NaN where a mask is empty (as
Quantus). The features are the map's values at input resolution (a mask covers every channel of a ``C``-channel
attribution); ties between equal values are broken in flat order (Quantus leaves them to ``np.argsort``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src.core import evaluation as ev
from funcam._src.core.metrics import as_masks
from funcam._src.core.similarity import average_ranks

__all__ = ["attribution_localisation", "relevance_mass_accuracy", "relevance_rank_accuracy", "top_k_intersection",
           "auc"]


def _prepare(x: Tensor, maps: Tensor, masks: Any, abs: bool, normalise: bool) -> tuple[Tensor, Tensor]:
    """Attributions and masks, both ``(B, K, n)`` (float64, bool)."""
    a = ev.setup(None, x, maps, None, abs=abs, normalise=normalise).a  # (B, K, C', H, W)
    b, k, c, h, w = a.shape
    if isinstance(masks, Tensor) and masks.ndim in (3, 4) and masks.shape[0] == b and masks.shape[-2:] == (h, w) \
            and (masks.ndim == 3 or masks.shape[1] == 1):
        masks = masks.reshape(b, 1, h, w).expand(b, k, h, w)
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a tensor (B, K, H, W), (B, H, W) or boxes (B, K, 4), got "
                        f"{type(masks).__name__}")
    m = as_masks(masks, a[:, :, 0])
    return a.flatten(2), m.unsqueeze(2).expand(b, k, c, h, w).flatten(2)


def _empty_nan(score: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(s.any(dim=-1), score, torch.full_like(score, float("nan"))).to(dtype)


def attribution_localisation(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, masks: Tensor,
                             weighted: bool = False, positive_attributions: bool = False, abs: bool = True,
                             normalise: bool = True) -> Tensor:
    """Attribution localisation (Kohlbrenner et al. 2020, IJCNN, Eq. 1-2): the share of the map's mass inside the
    mask, ``sum(a * s) / (sum(a) + 1e-9)`` (NaN above 1); ``weighted``: times the mask's share of the image
    (Eq. 2; Quantus 0.6 divides by the size of ``x_batch[2:]``, the batch from its third sample on, instead).
    positive_attributions: clip negative values to 0 first."""
    a, s = _prepare(x, maps, masks, abs, normalise)
    if positive_attributions:
        a = a.clamp_min(0)
    score = (a * s).sum(dim=-1) / (a.sum(dim=-1) + 1e-9)
    score = torch.where(score > 1, torch.full_like(score, float("nan")), score)
    if weighted:
        score = score * s.sum(dim=-1) / s.shape[-1]
    return _empty_nan(score, s, x.dtype)


def relevance_mass_accuracy(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, masks: Tensor,
                            abs: bool = False, normalise: bool = True) -> Tensor:
    """Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI", Information Fusion 81, Sec. 4.2):
    ``sum(a * s) / sum(a)``. funcam's ``energy_in_box`` is the same ratio of the positive part of the map."""
    a, s = _prepare(x, maps, masks, abs, normalise)
    return _empty_nan((a * s).sum(dim=-1) / a.sum(dim=-1), s, x.dtype)


def relevance_rank_accuracy(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, masks: Tensor,
                            abs: bool = False, normalise: bool = True) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022, Sec. 4.2): with K the mask's size, the share of the K highest
    map values that lie inside the mask."""
    a, s = _prepare(x, maps, masks, abs, normalise)
    rank = ev.rank_groups(a, 1, descending=True)
    size = s.sum(dim=-1, keepdim=True)
    hits = (s & (rank < size)).sum(dim=-1)
    return _empty_nan(hits / size[..., 0].clamp_min(1), s, x.dtype)


def top_k_intersection(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, masks: Tensor,
                       k: int = 1000, concept_influence: bool = False, abs: bool = False,
                       normalise: bool = True) -> Tensor:
    """Top-k intersection (Theiner et al. 2022, "Interpretable semantic photo geolocation", WACV, Sec. 5): the
    share of the map's ``k`` highest values that lie inside the mask; ``concept_influence``: divided by the mask's
    share of the image (Eq. 2)."""
    a, s = _prepare(x, maps, masks, abs, normalise)
    ev.positive_int(k, "k")
    if k >= a.shape[-1]:
        raise ValueError(f"k must be smaller than the map's {a.shape[-1]} values, got {k}")
    score = (s & (ev.rank_groups(a, 1, descending=True) < k)).sum(dim=-1).to(torch.float64) / k
    if concept_influence:
        score = score * s.shape[-1] / s.sum(dim=-1)
    return _empty_nan(score, s, x.dtype)


def auc(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, masks: Tensor, abs: bool = False,
        normalise: bool = True) -> Tensor:
    """AUC (Fawcett 2006, "An introduction to ROC analysis", Sec. 7): the area under the ROC curve of the map as a
    score for the mask, i.e. the Mann-Whitney statistic with average ranks for ties (what scikit-learn's
    ``roc_curve`` + ``auc`` give). NaN for an empty or a full mask."""
    a, s = _prepare(x, maps, masks, abs, normalise)
    pos = s.sum(dim=-1).to(torch.float64)
    neg = s.shape[-1] - pos
    ranks = (average_ranks(a) * s).sum(dim=-1)
    score = (ranks - pos * (pos + 1) / 2) / (pos * neg)
    return _empty_nan(torch.where(neg > 0, score, torch.full_like(score, float("nan"))), s, x.dtype)
