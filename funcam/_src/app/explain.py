"""One entry point over every method by name, for the command line and the dataset runner.

``explain(model, x, method=..., classes=..., top_k=..., layer=...) -> CAM`` with ``maps (B, K, h, w)`` for
every method: channel-weighting CAMs and attention relevance at feature (token-grid) resolution, Guided
Grad-CAM at input resolution (channel-wise maximum of the absolute guided gradient times the CAM), and
class-agnostic attention rollout repeated over the K requested classes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcam._src.base import CAM, Split
from funcam._src.core import methods
from funcam._src.core.cams import cam
from funcam._src.core.postprocess import fuse
from funcam._src.core.split import split as make_split
from funcam._src.cuts.timm import is_vit

# The command line's spelling of every method, how captions name them, and the guided ones: all from the one
# table (funcam._src.core.methods).
METHOD_NAMES = tuple(methods.cli_name(n) for n in methods.TABLE)
METHOD_TITLES = {methods.cli_name(n): m.title for n, m in methods.TABLE.items()}
GUIDED_METHODS = tuple(methods.cli_name(n) for n, m in methods.TABLE.items() if m.kind == "guided")


def default_method(model: nn.Module) -> str:
    """The method funcam recommends for ``model``: the Chefer et al. 2021 relevance rule for ViTs (it is
    class-specific where token Grad-CAM and plain rollout are not; see the README's quality table),
    Grad-CAM otherwise."""
    return "chefer" if is_vit(model) else "gradcam"


def check_method(method: str) -> str:
    """Normalise ``method`` (``gradcam_max`` or ``gradcam-max``) to the command line's spelling, or raise naming
    the valid ones."""
    return methods.cli_name(methods.get(method, spell=methods.cli_name).name)


def validate(model: nn.Module, size: int | tuple[int, int], *, method: str | None = None,
             layer: str | list[str] | None = None) -> int:
    """Check that ``method`` (and ``layer``) can explain ``model`` at input ``size`` and return the model's
    number of classes N, before any real work: ``explain`` runs once on one blank image for its top class.
    Raises ``ValueError`` with the reason (e.g. attention rollout on a CNN, Guided Backprop on a model without
    ReLU, an unknown layer); ``classes`` / ``top_k`` are then checked against N by the caller.
    """
    h, w = (size, size) if isinstance(size, int) else size
    param = next(iter(model.parameters()), None)
    blank = torch.zeros(1, 3, h, w) if param is None else param.new_zeros((1, 3, h, w))
    return int(explain(model, blank, method=method, top_k=1, layer=layer).logits.shape[1])


def explain(model: nn.Module | Split, x: Tensor, *, method: str | None = None, classes: Any = None,
            top_k: int | None = None, layer: str | list[str] | None = None, chunk_size: int | None = None,
            max_memory: int | None = None, relu: bool = True) -> CAM:
    """Maps for ``x (B, C, H, W)`` and the requested classes with any funcam method, by name.

    model: the model, or ``funcam.split(model, layer)`` built once and reused across calls (a graph-route split
    captures its graph once per input size; a model is split again at every call).
    method: one of ``METHOD_NAMES`` (None: ``default_method(model)``).
    classes / top_k: as in ``funcam.cam``. layer: the cut for CAM methods (``funcam.split``'s ``layer``;
    a list is fused by the mean of per-layer normalised maps at the first layer's resolution); not with a Split.
    chunk_size: classes per vmapped chunk; None chooses it from ``max_memory``.
    max_memory: bytes of per-class tensors allowed at once when ``chunk_size`` is None (default 128 MiB), for
    every method that vmaps over classes (``funcam.cam`` says what each one counts); the maps are the same
    whatever the chunks, to float rounding.
    Returns ``CAM(maps (B, K, h, w), classes (B, K), logits (B, N))``, detached: explanation only, run
    under ``torch.no_grad()`` so that memory does not grow with K (use ``funcam.cam`` for differentiable maps).
    """
    with torch.no_grad():
        return _explain(model, x, method, classes, top_k, layer, chunk_size, max_memory, relu)


def _explain(target: nn.Module | Split, x: Tensor, method: str | None, classes: Any, top_k: int | None,
             layer: str | list[str] | None, chunk_size: int | None, max_memory: int | None, relu: bool) -> CAM:
    if isinstance(target, Split):
        if layer is not None:
            raise ValueError("give layer= to funcam.split, not to explain, when explain is given a Split")
        model = target.module
    else:
        model = target
    m = methods.get(method or default_method(model), spell=methods.cli_name)
    if not isinstance(target, Split) and (m.kind == "cam" or m.name == "guided_gradcam"):
        target = make_split(model, layer)
    out = cam(target, x, classes, method=m.name, top_k=top_k, relu=relu, chunk_size=chunk_size,
              max_memory=max_memory)
    if isinstance(out.maps, tuple):
        out = out._replace(maps=fuse(out.maps, normalize_each=True))
    if m.kind == "guided":
        # (B, K, 3, H, W) -> (B, K, H, W): the strongest absolute response over colour channels.
        out = out._replace(maps=out.maps.abs().amax(dim=2))
    return out
