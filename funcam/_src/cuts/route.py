"""The route table: how each model family becomes a ``Split`` and where its attention probabilities come from.

einops' backend pattern: each route answers "do I apply?" (``applies(model, args)``), the first that applies wins,
the graph route (any model) last. A route gives ``split(model, args) -> Split`` and
``attention(model, x, graph) -> Source | None`` (None: the family has no attention of its own, and the graph
route's finds it in the captured graph). A new model family is one module with those three functions, one row
here and one test module.

===========  =================================================  ================================================
route        applies to                                         cut
===========  =================================================  ================================================
timm-vit     timm ViTs whose last block is pre-norm, plain      a token feature inside the last block
             softmax attention (checked on the block)
timm-swin    timm Swin v1 (pre-norm last block)                 norm2 of the last block
timm-maps    timm models whose ``forward_features`` is a map    ``forward_features``, timm's ``forward_head``
graph        any model (``torch.export``; ``torch.fx`` for FX   named values, or the last value on the input's
             names and models export cannot capture)           grid that reaches the output
===========  =================================================  ================================================
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import Tensor, nn

from funcam._src.base import Split
from funcam._src.cuts import auto, features, swin, vit
from funcam._src.cuts.attention import Source
from funcam._src.cuts.capture import SplitArgs


class Route(NamedTuple):
    """A model family: name; applies(model, args) -> bool; split(model, args) -> Split; attention(model, x, graph)
    -> Source | None (graph: a split's captured graph to reuse, or None)."""

    name: str
    applies: Callable[[nn.Module, SplitArgs], bool]
    split: Callable[[nn.Module, SplitArgs], Split]
    attention: Callable[[nn.Module, Tensor, Any], Source | None]


ROUTES: tuple[Route, ...] = (
    Route("timm-vit", vit.applies, vit.split, vit.attention),
    Route("timm-swin", swin.applies, swin.split, swin.attention),
    Route("timm-maps", features.applies, features.split, features.attention),
    Route("graph", auto.applies, auto.split, auto.attention),
)


def route_for(model: nn.Module, args: SplitArgs) -> Route:
    """The first route that applies to ``model``; ValueError when none does (``token_cut=`` on a model without
    transformer blocks to cut inside)."""
    for r in ROUTES:
        if r.applies(model, args):
            return r
    raise ValueError(f"split: token_cut={args.token_cut!r} applies to timm ViT and Swin models only, "
                     f"got a {type(model).__name__}")


def attention_source(model: nn.Module, x: Tensor, graph: Any = None) -> Source:
    """Where ``model``'s attention probabilities come from for inputs like ``x``: the first route with attention of
    its own (the graph route's always answers, or raises naming why the model has none)."""
    for r in ROUTES:
        src = r.attention(model, x, graph)
        if src is not None:
            return src
    raise AssertionError("the graph route answers for every model")  # pragma: no cover
