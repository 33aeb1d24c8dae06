"""Contrastive Grad-CAM: Finer-CAM (Zhang et al. 2025, eq. 3-4, as pytorch-grad-cam's ``FinerCAM``) and the plain
contrast "class a versus class b", each a score of the logits that the engine's one vjp differentiates for all K
classes at once.

Finer-CAM explains each class against its most similar classes: with logits ``y``, ``p = softmax(y)`` and the
classes ``j`` at the ranks ``comparison_categories`` (default 1, 2, 3) of ``|y - y_k|`` sorted ascending (rank 0 is
the class itself), the score is ``sum_j p_j (y_k - alpha y_j) / (sum_j p_j + 1e-9)`` (pytorch-grad-cam's
``FinerWeightedTarget``; ``p`` is differentiated too, as there), and the map is Grad-CAM's on that score. The
comparison classes are chosen from the logits of the image as given (the peer's ``target_idx``: the class itself);
ranks at or beyond the number of classes are dropped, as the peer does.

``versus``: each class ``k`` against the class ``versus[k]`` instead: the score ``y_k - alpha y_v``, whose Grad-CAM is
``gradcam(k) - alpha gradcam(v)`` before the ReLU (Grad-CAM is linear in the gradient).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from funcam._src.base import CAM, Split
from funcam._src.core import request
from funcam._src.core.engine import class_maps, logits_of
from funcam._src.core.projection import smoothed
from funcam._src.core.request import Option, Request, non_negative_float
from funcam._src.core.rules import GRADCAM
from funcam._src.core.smoothing import AUG_SMOOTH, EIGEN_SMOOTH, RELU

FINER_EPS = 1e-9  # pytorch-grad-cam's FinerWeightedTarget denominator eps


def _ints(text: str) -> tuple[int, ...]:
    """The command line's ``1,2,3``."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"expected integers separated by commas, e.g. 1,2,3; got {text!r}") from None


def _check_ranks(v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                                            for r in v):
        raise ValueError(f"comparison_categories must be a non-empty list of ranks >= 0 (1: the most similar class), "
                         f"got {v!r}")
    return tuple(v)


def _check_versus(v: Any) -> Tensor | None:
    if v is None:
        return None
    if callable(v):
        raise TypeError("versus must be class indices (an int, a list, a LongTensor (K,) or (B, K)), not a callable")
    return request.check_classes(list(v) if isinstance(v, tuple) else v)


FINER_OPTIONS = (
    RELU, AUG_SMOOTH, EIGEN_SMOOTH,
    # pytorch-grad-cam's name; not on the command line, whose --alpha is the heatmap's opacity
    Option("alpha", 1.0, non_negative_float("alpha"), "how much of the compared classes' scores is subtracted"),
    Option("comparison_categories", (1, 2, 3), _check_ranks,
           "ranks of the compared classes among the most similar (1: the nearest logit)", _ints),
    Option("versus", None, _check_versus, "contrast each class with these classes (K,) instead (y_k - alpha y_v)",
           _ints),
)


def comparisons(logits: Tensor, idx: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """The compared classes ``(B, K, J)``: for each explained class ``idx (B, K)``, the classes at ``ranks`` of the
    logits ``(B, N)`` sorted by ``|y_n - y_k|`` (stable: ties in index order); ranks >= N dropped."""
    d = (logits.unsqueeze(1) - logits.gather(1, idx).unsqueeze(2)).abs()  # (B, K, N)
    order = torch.sort(d, dim=2, stable=True).indices
    keep = [r for r in ranks if r < logits.shape[1]]
    return order[:, :, keep]


def finer_scores(logits: Tensor, idx: Tensor, cmp: Tensor, alpha: float) -> Tensor:
    """Finer-CAM's score (module docstring) for every explained class: logits (B, N) -> (B, K)."""
    p = torch.softmax(logits, dim=1)
    b, k, j = cmp.shape
    yj = logits.gather(1, cmp.reshape(b, k * j)).view(b, k, j)
    pj = p.gather(1, cmp.reshape(b, k * j)).view(b, k, j)
    yk = logits.gather(1, idx).unsqueeze(2)
    return (pj * (yk - alpha * yj)).sum(dim=2) / (pj.sum(dim=2) + FINER_EPS)


def _versus(req: Request, logits: Tensor, idx: Tensor) -> Tensor:
    """The ``versus`` classes as ``(B, K, 1)``, one per explained class."""
    v = request.resolve(req.with_classes(req.options["versus"]), logits)
    if v.shape != idx.shape:
        raise ValueError(f"versus must give one class per explained class, (K,) or (B, K) = {tuple(idx.shape)}; "
                         f"got shape {tuple(req.options['versus'].shape)}")
    return v.unsqueeze(2)


def finer_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """Finer-CAM (or the ``versus`` contrast) for every image and requested class: maps ``(B, K, h, w)``, Grad-CAM of
    the contrastive scores from one forward and one vmapped vjp."""
    if req.score_fn is not None:
        raise ValueError("finercam contrasts classes of the model's logits: classes must be indices (or None for the "
                         "top classes), not a callable")
    o = req.options
    fixed: dict = {}  # the classes and their comparisons, chosen once from the first (plain) forward's logits

    def scores(out: Any) -> Tensor:
        lg = logits_of(out)
        if not fixed:
            idx = request.resolve(req, lg.detach())
            fixed["idx"] = idx
            fixed["cmp"] = (comparisons(lg.detach(), idx, o["comparison_categories"]) if o["versus"] is None else
                            _versus(req, lg.detach(), idx))
        if o["versus"] is not None:
            return lg.gather(1, fixed["idx"]) - o["alpha"] * lg.gather(1, fixed["cmp"][..., 0])
        return finer_scores(lg, fixed["idx"], fixed["cmp"], o["alpha"])

    rule = smoothed(GRADCAM) if o["eigen_smooth"] else GRADCAM
    out = class_maps(split, x, req._replace(classes=scores, top_k=None), rule)
    return out._replace(classes=fixed["idx"])
