"""One forward at a split's cut for the methods that weight its channels without the engine's vmapped vjp
(Score-CAM, Ablation-CAM, Eigen-CAM): the feature map, the model's output, the classes to explain, and the scores
of any other output of the same model for those classes.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from funcam._src.base import Features, Split, as_features
from funcam._src.core.engine import class_indices, logits_of, logits_or_output
from funcam._src.core.request import Request


class AtCut(NamedTuple):
    """a: the feature map ``(B, C, h, w)``; feats / rebuild: as ``funcam.base.as_features`` gives them (the head
    takes ``rebuild((a,))``); idx: ``(B, K)`` the columns of the scores to explain; picked: the class indices to
    report (None for a score callable); logits: what ``CAM.logits`` reports; scores: ``(B, K)`` the explained
    scores themselves."""

    a: Tensor
    feats: Features
    rebuild: Callable[[tuple], Any]
    idx: Tensor
    picked: Tensor | None
    logits: Any
    scores: Tensor


def at_cut(split: Split, x: Tensor, req: Request, method: str, *, levels: bool = False) -> AtCut:
    """``split.extract(x)``, the head on it once, and the classes ``req`` asks for; raises ValueError naming
    ``method`` for a split at several layers (these methods weight the channels of one map). levels: a split at
    several layers is taken (a detector's FPN levels, for the class-agnostic maps computed level by level): ``a`` is
    then the first level, ``feats.maps`` has them all."""
    def one_layer_only(where: Any) -> ValueError:
        return ValueError(f"{method} takes a split at one layer, got one at {where} (run it once per layer and fuse "
                          f"the maps with funcam.fuse)")

    if not levels and len(split.layers) > 1:  # known before any work
        raise one_layer_only(list(split.layers))
    feats, rebuild = as_features(split.extract(x))
    if not levels and (len(feats.maps) != 1 or feats.maps[0].ndim != 4):
        raise one_layer_only(list(split.layers) or len(feats.maps))
    if any(a.ndim != 4 for a in feats.maps):
        raise ValueError(f"{method} takes (B, C, h, w) feature maps, got shapes "
                         f"{[tuple(a.shape) for a in feats.maps]} at {list(split.layers)}")
    out = split.head(rebuild(feats.maps))
    scores = req.score_fn(out) if req.score_fn is not None else logits_of(out)
    logits = logits_or_output(out) if req.score_fn is not None else scores
    idx, picked = class_indices(scores, logits, req, x.shape[0])
    return AtCut(feats.maps[0], feats, rebuild, idx, picked, logits, scores.gather(1, idx))


def class_scores(out: Any, idx: Tensor, req: Request) -> Tensor:
    """The explained scores ``(B, K)`` of one more model output ``out`` for B images: the logits at ``idx (B, K)``,
    or the score callable's columns."""
    if req.score_fn is not None:
        return req.score_fn(out)
    return logits_of(out).gather(1, idx)


def grouped_scores(out: Any, idx: Tensor, req: Request, n: int) -> Tensor:
    """``class_scores`` of an output of ``n * B`` images ordered group-major (image b of group i at row i B + b):
    ``(n, B, K)``. A score callable sees one group of B images at a time, as in a plain call (it may hold
    per-image data, e.g. ``emb @ refs.T`` with B reference rows)."""
    b = idx.shape[0]
    if req.score_fn is None:
        lg = logits_of(out)
        return lg.view(n, b, -1).gather(2, idx.expand(n, -1, -1))
    return torch.stack([req.score_fn(_rows(out, i * b, (i + 1) * b, n * b)) for i in range(n)])


def _rows(out: Any, lo: int, hi: int, total: int) -> Any:
    """Rows ``lo:hi`` of every tensor in ``out`` (a tensor, tuple, dict, ModelOutput) that has ``total`` rows."""
    return pytree.tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) and t.ndim and t.shape[0] == total else t, out)
