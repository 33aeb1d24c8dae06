"""One entry point over every method by name, for the command line and the dataset runner.

``explain(model, x, method=..., classes=..., top_k=..., layer=..., **options) -> CAM`` with ``maps (B, K, h, w)``
for every method of the table (``funcam._src.core.methods``): maps at feature (token-grid) resolution as the
method gives them, a multi-layer cut fused into one map, and input attributions ``(B, K, C, H, W)`` folded over
the colour channels as the method's entry says (Guided Backprop: the largest absolute value; signed attributions:
their sum).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcam._src.base import CAM, Split
from funcam._src.core import methods
from funcam._src.core.cams import cam
from funcam._src.core.postprocess import fuse
from funcam._src.cuts.vit import is_vit

# The command line's spelling of every method and how captions name them: all from the one table.
METHOD_NAMES = tuple(methods.cli_name(n) for n in methods.TABLE)
METHOD_TITLES = {methods.cli_name(n): m.title for n, m in methods.TABLE.items()}


def default_method(model: nn.Module | Split) -> str:
    """The method funcam recommends for ``model``: the Chefer et al. 2021 relevance rule for ViTs (it is
    class-specific where token Grad-CAM and plain rollout are not; see the README's quality table),
    Grad-CAM otherwise."""
    model = model.module if isinstance(model, Split) else model
    return "chefer" if isinstance(model, nn.Module) and is_vit(model) else "gradcam"


def check_method(method: str) -> str:
    """Normalise ``method`` (``gradcam_max`` or ``gradcam-max``) to the command line's spelling, or raise naming
    the valid ones."""
    return methods.cli_name(methods.get(method, spell=methods.cli_name).name)


def method_of(method: str) -> methods.Method:
    """The table entry of ``method`` in either spelling (ValueError naming the valid ones as the command line
    spells them)."""
    return methods.get(method, spell=methods.cli_name)


def validate(model: nn.Module | Split, size: int | tuple[int, int], *, method: str | None = None,
             layer: str | list[str] | None = None, **options: Any) -> int:
    """Check that ``method`` (with ``layer`` and its options) can explain ``model`` at input ``size`` and return the
    model's number of classes N, before any real work: ``explain`` runs once on one blank image for its top class.
    Raises ``ValueError`` with the reason (e.g. attention rollout on a CNN, Guided Backprop on a model without
    ReLU, an unknown layer); ``classes`` / ``top_k`` are then checked against N by the caller.
    """
    h, w = (size, size) if isinstance(size, int) else size
    module = model.module if isinstance(model, Split) else model
    param = next(iter(module.parameters()), None) if isinstance(module, nn.Module) else None
    chans = getattr(model, "in_chans", None) or 3
    blank = torch.zeros(1, chans, h, w) if param is None else param.new_zeros((1, chans, h, w))
    return int(explain(model, blank, method=method, top_k=1, layer=layer, **options).logits.shape[1])


def explain(model: nn.Module | Split, x: Tensor, *, method: str | None = None, classes: Any = None,
            top_k: int | None = None, layer: str | list[str] | None = None, chunk_size: int | None = None,
            max_memory: int | None = None, **options: Any) -> CAM:
    """Maps ``(B, K, h, w)`` for ``x (B, C, H, W)`` and the requested classes with any funcam method, by name.

    model: the model, or ``funcam.split(model, layer)`` built once and reused across calls (a graph-route split
    captures its graph once per input size; a model is split again at every call).
    method: one of ``METHOD_NAMES`` (None: ``default_method(model)``).
    classes / top_k / chunk_size / max_memory / options (the method's own, e.g. ``relu=False``): as in
    ``funcam.cam``. layer: the cut for the methods at a cut (``funcam.split``'s ``layer``; a list is fused by the
    mean of per-layer normalised maps at the first layer's resolution); not with a Split, and refused by the
    methods of the whole model.
    Returns ``CAM(maps (B, K, h, w), classes (B, K), logits (B, N))``, detached: explanation only, run under
    ``torch.no_grad()`` so that memory does not grow with K (use ``funcam.cam`` for differentiable maps).
    """
    m = method_of(method or default_method(model))
    with torch.no_grad():
        out = cam(model, x, classes, method=m.name, top_k=top_k, layer=layer, chunk_size=chunk_size,
                  max_memory=max_memory, **options)
    return fold(m, out)


def fold(m: methods.Method, out: CAM) -> CAM:
    """One map per image and class from what ``m`` computed: several layers fused, colour channels folded."""
    if isinstance(out.maps, tuple):
        out = out._replace(maps=fuse(out.maps, normalize_each=True))
    if m.output == "input":
        maps = out.maps.abs().amax(dim=2) if m.fold == "absmax" else out.maps.sum(dim=2)
        out = out._replace(maps=maps)
    return out


def drawn_as_gradient(m: methods.Method) -> bool:
    """Whether pictures show ``m``'s input attributions as a gradient image (Guided Backprop's tradition) rather
    than a heatmap: unsigned per-channel attributions. Signed ones are heatmaps on a diverging scale."""
    return m.output == "input" and not m.signed


def cmap_for(m: methods.Method, chosen: str | None, relu: bool = True) -> str:
    """The colour map for ``m``'s heatmaps: the one ``chosen``, else a diverging one (bwr) for signed maps (the
    method's own, or a CAM with ``relu=False``), else jet."""
    return chosen or ("bwr" if m.signed or not relu else "jet")
