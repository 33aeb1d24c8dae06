"""One entry point over every method by name, for the command line and the dataset runner.

``explain(model, x, method=..., classes=..., top_k=..., layer=...) -> CAM`` with ``maps (B, K, h, w)`` for
every method: channel-weighting CAMs and attention relevance at feature (token-grid) resolution, Guided
Grad-CAM at input resolution (channel-wise maximum of the absolute guided gradient times the CAM), and
class-agnostic attention rollout repeated over the K requested classes.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor, nn

from funcam._src.core.cams import METHODS as CAM_METHODS, cam
from funcam._src.core.engine import CAM, class_indices
from funcam._src.core.split import Split, split as make_split

# CLI spelling (dashes) -> internal name; every funcam method.
ATTENTION_METHODS = ("rollout", "grad-rollout", "chefer")
GUIDED_METHODS = ("guided-gradcam", "guided-backprop")
METHOD_NAMES = tuple(m.replace("_", "-") for m in CAM_METHODS) + ATTENTION_METHODS + GUIDED_METHODS
# how captions, grid rows and overlays name each method
METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM", "hirescam": "HiResCAM",
                 "layercam": "LayerCAM", "elementwise": "Element-wise Grad-CAM", "gradcam-max": "Grad-CAM (max)",
                 "argmax-channel": "argmax channel", "rollout": "attention rollout", "grad-rollout": "grad rollout",
                 "chefer": "Chefer relevance", "guided-gradcam": "Guided Grad-CAM", "guided-backprop": "Guided Backprop"}


def default_method(model: nn.Module) -> str:
    """The method funcam recommends for ``model``: the Chefer et al. 2021 relevance rule for ViTs (it is
    class-specific where token Grad-CAM and plain rollout are not; see the README's quality table),
    Grad-CAM otherwise."""
    from funcam._src.cuts.timm import is_vit

    return "chefer" if is_vit(model) else "gradcam"


def check_method(method: str) -> str:
    """Normalise ``method`` (``gradcam_max`` or ``gradcam-max``) or raise naming the valid ones."""
    name = str(method).replace("_", "-")
    if name not in METHOD_NAMES:
        near = difflib.get_close_matches(name, METHOD_NAMES, n=1)
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}; got {method!r}"
                         + (f" (did you mean {near[0]!r}?)" if near else ""))
    return name


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
            relu: bool = True) -> CAM:
    """Maps for ``x (B, C, H, W)`` and the requested classes with any funcam method, by name.

    model: the model, or ``funcam.split(model, layer)`` built once and reused across calls (a graph-route split
    captures its graph once per input size; a model is split again at every call).
    method: one of ``METHOD_NAMES`` (None: ``default_method(model)``).
    classes / top_k: as in ``funcam.cam``. layer: the cut for CAM methods (``funcam.split``'s ``layer``;
    a list is fused by the mean of per-layer normalised maps at the first layer's resolution); not with a Split.
    Returns ``CAM(maps (B, K, h, w), classes (B, K), logits (B, N))``, detached: explanation only, run
    under ``torch.no_grad()`` so that memory does not grow with K (use ``funcam.cam`` for differentiable maps).
    """
    with torch.no_grad():
        return _explain(model, x, method, classes, top_k, layer, chunk_size, relu)


def _explain(target: nn.Module | Split, x: Tensor, method: str | None, classes: Any, top_k: int | None,
             layer: str | list[str] | None, chunk_size: int | None, relu: bool) -> CAM:
    if isinstance(target, Split):
        if layer is not None:
            raise ValueError("give layer= to funcam.split, not to explain, when explain is given a Split")
        model, sp = target.module, target
    else:
        model, sp = target, None
    name = check_method(method or default_method(model))
    if name.replace("-", "_") in CAM_METHODS:
        sp = sp if sp is not None else make_split(model, layer)
        out = cam(sp, x, classes, method=name.replace("-", "_"), top_k=top_k, relu=relu, chunk_size=chunk_size)
        if isinstance(out.maps, tuple):
            from funcam._src.core.postprocess import fuse

            out = out._replace(maps=fuse(out.maps, normalize_each=True))
        return out
    if name == "rollout":
        from funcam._src.core.rollout import rollout_with_logits

        if callable(classes) and top_k is not None:
            raise ValueError("top_k does not apply when classes is a callable")
        m, logits = rollout_with_logits(target, x)  # logits and attentions from one forward
        # class-agnostic: the classes (or a score callable's K columns) only say how often to repeat the map
        score_fn = classes if callable(classes) else None
        idx, picked = class_indices(score_fn(logits) if score_fn else logits, logits, classes, score_fn, top_k,
                                    x.shape[0])
        return CAM(m.unsqueeze(1).expand(-1, idx.shape[1], -1, -1), picked, logits)
    if name in ("grad-rollout", "chefer"):
        from funcam._src.core import rollout

        fn = rollout.grad_rollout if name == "grad-rollout" else rollout.chefer_relevance
        return fn(target, x, classes, top_k=top_k, chunk_size=chunk_size, return_cam=True)
    from funcam._src.core import guided

    if name == "guided-backprop":
        out = guided.guided_backprop(model, x, classes, top_k=top_k, chunk_size=chunk_size, return_cam=True)
    else:
        out = guided.guided_gradcam(target, x, classes, top_k=top_k, layer=layer, chunk_size=chunk_size,
                                    return_cam=True)
    # (B, K, 3, H, W) -> (B, K, H, W): the strongest absolute response over colour channels.
    return out._replace(maps=out.maps.abs().amax(dim=2))

