"""The public map functions: ``funcam.cam`` for every method of ``methods.TABLE``, and one shortcut per method
(``funcam.gradcam(...)`` is ``funcam.cam(..., method="gradcam").maps``). Shapes: ``x (B, C, H, W)`` in; maps
``(B, K, h, w)`` at feature (token-grid) resolution out, or ``(B, K, C, H, W)`` input attributions for the methods
whose ``output`` is ``"input"``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core import methods, request
from funcam._src.core.split import in_chans_of
from funcam._src.core.split import split as make_split

METHODS = methods.CAM_METHODS


@_guard.entry(in_chans=in_chans_of)
def cam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, method: str = "gradcam",
        top_k: int | None = None, layer: str | Sequence[str] | None = None, chunk_size: int | None = None,
        max_memory: int | None = None, **options: Any) -> CAM:
    """Maps for B images x K classes with any funcam method, from one forward and one vmapped vjp.

    model_or_split: a model, or a ``funcam.Split`` built once and reused (a graph-route split captures its graph
        once per input size; a model is split again at every call).
    x: ``(B, C, H, W)`` input.
    classes: which scores to explain:
        ``None`` (the ``top_k`` predicted classes, default 1); an int or list of ints; a LongTensor ``(K,)``
        shared by the batch or ``(B, K)`` per image; or a callable ``output -> scores (B, K)`` (softmax
        probability, a margin, a mask's mean of a segmentation output, similarity of an embedding, the targets of
        ``funcam.targets``), each score explained as one "class".
    method: a name of the method table (dashes or underscores; ``funcam.explain.METHOD_NAMES`` lists them).
    layer: for the methods that explain features at a cut (the CAM families): where to cut a model, as in
        ``funcam.split``; not with a Split (give it to ``funcam.split``), not for methods of the whole model.
    chunk_size: classes per vmapped chunk, bounding memory to about ``chunk_size`` classes' tensors at once;
        None chooses it from ``max_memory``.
    max_memory: bytes of per-class tensors allowed at once when ``chunk_size`` is None (default 128 MiB): each
        method counts what one class holds (a CAM's (B, C, h, w) gradient, a relevance method's gradients at every
        attention layer, an input gradient and its backward's activation gradients, ...). A bound on what funcam
        adds, not on the model's own forward.
    options: the method's own options (``relu`` for the CAM families, ...); each method's shortcut lists its own.

    Returns ``CAM(maps, classes (B, K) or None for a callable, logits (B, N))``: maps ``(B, K, h, w)``; a tuple
    of them for a multi-layer split (fuse them with ``funcam.fuse``); ``(B, K, C, H, W)`` for input attributions.
    """
    m = methods.get(method)
    req = request.parse(m.options, classes=classes, top_k=top_k, chunk_size=chunk_size, max_memory=max_memory,
                        method=m.name, **options)
    return m.compute(target_for(m, model_or_split, layer), x, req)


def target_for(m: methods.Method, model_or_split: Any, layer: str | Sequence[str] | None) -> Any:
    """What ``m.compute`` takes: a Split for the methods at a cut (the model split at ``layer``), else the model or
    Split as given; raises for a ``layer`` that cannot apply."""
    if m.needs != "split":
        if layer is not None:
            raise ValueError(f"layer= does not apply to method {m.name!r}: it explains the whole model, not the "
                             f"features at a cut (got layer={layer!r})")
        return model_or_split
    if isinstance(model_or_split, Split):
        if layer is not None:
            raise ValueError("give layer= to funcam.split, not to funcam.cam, when it is given a Split")
        return model_or_split
    return make_split(_guard.unwrap(model_or_split), layer)


def _shortcut(name: str, public: str | None = None) -> Callable[..., Tensor]:
    m = methods.TABLE[name]

    def shortcut(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, **kwargs: Any) -> Tensor:
        return cam(model_or_split, x, classes, method=name, **kwargs).maps

    shortcut.__name__ = shortcut.__qualname__ = public or name
    shortcut.__doc__ = methods.describe(m)
    return shortcut


gradcam = _shortcut("gradcam")
gradcam_max = _shortcut("gradcam_max")
gradcampp = _shortcut("gradcampp")
xgradcam = _shortcut("xgradcam")
hirescam = _shortcut("hirescam")
elementwise = _shortcut("elementwise")
layercam = _shortcut("layercam")
argmax_channel = _shortcut("argmax_channel")
rollout = _shortcut("rollout")
grad_rollout = _shortcut("grad_rollout")
chefer_relevance = _shortcut("chefer", "chefer_relevance")
guided_backprop = _shortcut("guided_backprop")
guided_gradcam = _shortcut("guided_gradcam")
attnlrp = _shortcut("attnlrp")
cplrp = _shortcut("cplrp")
lrp = _shortcut("lrp")
scorecam = _shortcut("scorecam")
sscam = _shortcut("sscam")
iscam = _shortcut("iscam")
ablationcam = _shortcut("ablationcam")
eigencam = _shortcut("eigencam")
eigengradcam = _shortcut("eigengradcam")
finercam = _shortcut("finercam")
fullgrad = _shortcut("fullgrad")
shapleycam = _shortcut("shapleycam")
saliency = _shortcut("saliency")
input_x_gradient = _shortcut("input_x_gradient")
integrated_gradients = _shortcut("integrated_gradients")
smoothgrad = _shortcut("smoothgrad")
vargrad = _shortcut("vargrad")
gradient_shap = _shortcut("gradient_shap")
occlusion = _shortcut("occlusion")
