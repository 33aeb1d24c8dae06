"""The types every layer of funcam shares; imports nothing of funcam.

``Split(extract, head)`` is a model as two pure callables; ``Features`` is what ``extract`` may return when the
head needs more than the maps; ``Pooled`` describes a head that starts with global average pooling; ``CAM`` is
what the per-class entry points return.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import Tensor, nn

__version__ = "0.1.0"

__all__ = ["CAM", "Features", "Pooled", "Reduce", "Split", "as_features"]

Reduce = Callable[[Tensor, Tensor], Tensor]  # (g (B, C, h, w), A (B, C, h, w)) -> map (B, h, w)


class Features(NamedTuple):
    """What ``extract`` returns when the head needs more than the maps.

    maps: tuple of ``(B, C_i, h_i, w_i)`` tensors, the feature maps the CAMs are computed on.
    context: tensors the head needs but that are not explained (a ViT's residual stream and prefix tokens,
        values that skip over an FX cut); they are held constant when differentiating.
    chained: True when the head recomputes ``maps[1:]`` from ``maps[0]`` (several cut points on one path).
        The head then uses ``maps[i]`` for ``i >= 1`` only as a zero-valued tap for its gradient, so the
        gradient at an earlier map is the total derivative through the later ones.
    """

    maps: tuple
    context: tuple = ()
    chained: bool = False


class Pooled(NamedTuple):
    """A head that starts with global average pooling, as a function of the pooled feature.

    ``head(A) == classifier(pre_logits(A.mean((2, 3))))`` for every ``A (B, C, h, w)``, so the gradient of
    any logit w.r.t. ``A`` is constant over space, ``d logit / dA = (d logit / dz) / (h w)``: CAMs then need
    only ``(B, C)`` gradients, and the gradient of a logit at the classifier's input is its weight row.

    pre_logits: ``z (B, C) -> (B, D)``; classifier: the final ``nn.Linear`` (``(N, D)`` weight), or None
    when ``pre_logits`` already returns logits ``(B, N)``.
    """

    pre_logits: Callable[[Tensor], Tensor]
    classifier: nn.Module | None = None


class Split(NamedTuple):
    """A model as two pure callables.

    extract: ``x (B, in_chans, H, W) -> Tensor | tuple[Tensor, ...] | Features``.
    head: takes exactly what ``extract`` returned, gives logits ``(B, num_classes)``.
    in_chans: input channels, checked before the forward when known.
    layers: where the model was cut, one name per feature map in the order of ``Features.maps``
        (e.g. ``("layer3", "layer4")``, ``("blocks.11.norm1",)``, ``("forward_features",)``).
    pooled: the head as a function of the spatially averaged feature when it starts with global average
        pooling (``Pooled``), else None; it enables the exact fast path for many classes. A graph-route split,
        whose head differs per captured input size, has instead a function ``features -> Pooled | None`` (the
        ``Pooled`` of the capture those features came from, bound to their context).
    module: the model the split was cut from, or None: funcam checks ``x``'s dtype against its parameters
        and handles its training mode (a warning; batch-norm statistics restored after each call).
    graph: the captured graphs of a graph-route split (``funcam._src.cuts.auto.GraphCut``), reused by the attention
        relevance functions; None otherwise.
    shifted: ``(features, s (B, C)) -> output``: the head with ``s`` added at every position of the (single) feature
        map, written so that its Jacobian in ``s`` at ``s = 0`` is cheap in forward mode; it equals
        ``head(maps + s)`` at ``s = 0`` and so does its derivative there (it may be a linearisation elsewhere).
        Grad-CAM's weights are that Jacobian over the number of positions; None: ``head`` itself is used.
    """

    extract: Callable[[Tensor], Any]
    head: Callable[[Any], Tensor]
    in_chans: int | None = None
    layers: tuple[str, ...] = ()
    pooled: Pooled | Callable[[Any], Pooled | None] | None = None
    module: nn.Module | None = None
    graph: Any = None
    shifted: Callable[[Any, Tensor], Any] | None = None


class CAM(NamedTuple):
    """maps: ``(B, K, h, w)`` raw maps at feature resolution (a tuple of them for a multi-layer split);
    classes: ``(B, K)`` class indices explained (None when ``classes`` was a score callable);
    logits: ``(B, num_classes)`` from the same forward (a model whose output is not logits - a dict, an
    embedding - reports its output here as it is)."""

    maps: Any
    classes: Tensor | None
    logits: Tensor


def as_features(feats: Any) -> tuple[Features, Callable[[tuple], Any]]:
    """Normalise what ``extract`` returned to ``Features`` and a function putting new maps back in place."""
    if isinstance(feats, Features):
        return feats, lambda maps: Features(tuple(maps), feats.context, feats.chained)
    if isinstance(feats, Tensor):
        return Features((feats,)), lambda maps: maps[0]
    if isinstance(feats, (tuple, list)) and feats and all(isinstance(f, Tensor) for f in feats):
        kind = type(feats)
        return Features(tuple(feats)), lambda maps: kind(maps)
    raise TypeError(f"extract must return a Tensor, a tuple of Tensors or funcam.Features, got {type(feats).__name__}")
