"""Public CAM functions: ``(split, x (B, C, H, W), classes) -> maps (B, K, h, w)`` at feature resolution."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor, nn

from funcam._src.core.engine import CAM, class_maps
from funcam._src.core.split import Split, split as make_split
from funcam._src.core.rules import CHANNEL_WEIGHTS, POOLED_RULES, RULES

METHODS = tuple(RULES)


def cam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, method: str = "gradcam",
        top_k: int | None = None, relu: bool = True, chunk_size: int | None = None,
        max_memory: int | None = None) -> CAM:
    """Class activation maps for B images x K classes from one forward and one vmapped vjp.

    model_or_split: a ``funcam.Split`` (or a model, split with ``funcam.split(model)``'s default rule).
    x: ``(B, C, H, W)`` input.
    classes: which logits to explain:
        ``None`` (the ``top_k`` predicted classes, default 1); an int or list of ints; a LongTensor ``(K,)``
        shared by the batch or ``(B, K)`` per image; or a callable ``logits (B, N) -> scores (B, K)``
        (softmax probability, a margin, ...), each score explained as one "class".
    method: one of ``funcam.METHODS``: gradcam, gradcam_max, gradcampp, xgradcam, hirescam, elementwise,
        layercam, argmax_channel.
    relu: apply ReLU at feature resolution (before any upsampling); ``False`` gives signed maps.
    chunk_size: classes per vmapped chunk, bounding memory to about ``chunk_size`` gradients at once;
        None chooses it from ``max_memory``.
    max_memory: bytes of per-class tensors allowed at once when ``chunk_size`` is None (default 128 MiB): the
        general path's (B, C, h, w) gradients, or the average-pool fast path's (B, C) gradients with the
        rule's temporaries; a bound on what funcam adds, not on the model's own forward.

    Returns ``CAM(maps (B, K, h, w), classes (B, K) or None, logits (B, N))``; for a multi-layer split,
    ``maps`` is a tuple of ``(B, K, h_i, w_i)`` (fuse them with ``funcam.fuse``).
    """
    rule = RULES.get(method) if isinstance(method, str) else None
    if rule is None:
        near = difflib.get_close_matches(str(method), METHODS, n=3)
        raise ValueError(f"method must be one of {METHODS}, got {method!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    sp = model_or_split if isinstance(model_or_split, Split) else make_split(model_or_split)
    out = class_maps(sp, x, classes, rule, top_k=top_k, chunk_size=chunk_size, weights=CHANNEL_WEIGHTS.get(method),
                     pooled_reduce=POOLED_RULES[method], max_memory=max_memory)
    if relu:
        # ReLU at feature resolution: upsampling first would let one large negative value bleed into
        # its neighbours.
        maps = tuple(torch.relu(m) for m in out.maps) if isinstance(out.maps, tuple) else torch.relu(out.maps)
        out = out._replace(maps=maps)
    return out


def _method(name: str, doc: str):
    def fn(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, **opts: Any) -> Tensor:
        return cam(model_or_split, x, classes, method=name, **opts).maps

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (f"{doc}\n\n``{name}(split, x (B, C, H, W), classes=None, *, top_k=None, relu=True, chunk_size=None, max_memory=None)"
                  f" -> (B, K, h, w)``; the arguments are those of ``funcam.cam``.")
    return fn


gradcam = _method("gradcam", "Grad-CAM (Selvaraju et al. 2017): channel weights are spatially averaged gradients.")
gradcampp = _method("gradcampp", "Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): weights from positive gradients "
                    "with pixel-wise alphas.")
gradcam_max = _method("gradcam_max", "Grad-CAM with max-pooled gradients as channel weights.")
xgradcam = _method("xgradcam", "XGrad-CAM (Fu et al. 2020): activation-normalised gradient weights.")
hirescam = _method("hirescam", "HiResCAM (Draelos & Carin 2020): element-wise gradient x activation summed over channels.")
elementwise = _method("elementwise", "Element-wise Grad-CAM: ReLU(gradient x activation) summed over channels.")
layercam = _method("layercam", "LayerCAM (Jiang et al. 2021): ReLU(gradient) x activation summed over channels.")
argmax_channel = _method("argmax_channel", "The feature channel with the largest Grad-CAM weight.")
