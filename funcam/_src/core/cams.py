"""The public map functions: ``funcam.cam`` for every method of ``methods.TABLE``, and one typed shortcut per
method. Shapes: ``x (B, C, H, W)`` in; maps ``(B, K, h, w)`` at feature (or token-grid) resolution out, or
``(B, K, C, H, W)`` input gradients for the guided methods. ``cam`` returns ``CAM(maps, classes, logits)``; every
shortcut returns the maps alone.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core import methods
from funcam._src.core.engine import _check_chunk, _check_max_memory, class_maps
from funcam._src.core.guided import guided_backprop_cam, guided_gradcam_cam
from funcam._src.core.rollout import relevance, rollout_cam
from funcam._src.core.split import in_chans_of, split as make_split

METHODS = methods.CAM_METHODS


@_guard.entry(in_chans=in_chans_of)
def cam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, method: str = "gradcam",
        top_k: int | None = None, relu: bool = True, chunk_size: int | None = None,
        max_memory: int | None = None) -> CAM:
    """Maps for B images x K classes with any funcam method, from one forward and one vmapped vjp.

    model_or_split: a ``funcam.Split`` (or a model, split with ``funcam.split(model)``'s default rule; a split
        built once and reused saves the graph capture of models without timm's split).
    x: ``(B, C, H, W)`` input.
    classes: which scores to explain:
        ``None`` (the ``top_k`` predicted classes, default 1); an int or list of ints; a LongTensor ``(K,)``
        shared by the batch or ``(B, K)`` per image; or a callable ``output -> scores (B, K)`` (softmax
        probability, a margin, a mask's mean of a segmentation output, similarity of an embedding ...), each
        score explained as one "class".
    method: a name of ``funcam._src.core.methods.TABLE`` (dashes or underscores): the CAM methods of
        ``funcam.METHODS`` (gradcam, gradcam_max, gradcampp, xgradcam, hirescam, elementwise, layercam,
        argmax_channel), the transformer methods rollout, grad_rollout and chefer, or guided_backprop and
        guided_gradcam.
    relu: CAM methods: ReLU at feature resolution (before any upsampling); ``False`` gives signed maps.
    chunk_size: classes per vmapped chunk, bounding memory to about ``chunk_size`` gradients at once;
        None chooses it from ``max_memory``.
    max_memory: bytes of per-class tensors allowed at once when ``chunk_size`` is None (default 128 MiB): the
        general path's (B, C, h, w) gradients, or the average-pool fast path's (B, C) gradients with the
        rule's temporaries; for grad_rollout and chefer, each class's gradients at every attention layer's
        probabilities (B, heads, N, N) and its token activation gradients (B, N, width); for the guided
        methods, each class's input gradient (B, C, H, W) and its backward's activation gradients (64 bytes
        per input byte). A bound on what funcam adds, not on the model's own forward.

    Returns ``CAM(maps, classes (B, K) or None for a callable, logits (B, N))``: maps ``(B, K, h, w)``; a tuple
    of them for a multi-layer split (fuse them with ``funcam.fuse``); ``(B, K, C, H, W)`` for the guided methods.
    """
    m = methods.get(method)
    if m.kind == "cam":
        sp = model_or_split if isinstance(model_or_split, Split) else make_split(model_or_split)
        out = class_maps(sp, x, classes, m.rule, top_k=top_k, chunk_size=chunk_size, weights=m.weights,
                         pooled_reduce=m.pooled, max_memory=max_memory, mean_rule=m.mean)
        if relu:
            # ReLU at feature resolution: upsampling first would let one large negative value bleed into
            # its neighbours.
            out = out._replace(maps=tuple(torch.relu(a) for a in out.maps) if isinstance(out.maps, tuple)
                               else torch.relu(out.maps))
        return out
    if m.kind == "relevance":
        return relevance(model_or_split, x, classes, m.rule, top_k, chunk_size, max_memory)
    if m.kind == "rollout":
        # one class-agnostic map, nothing per class to chunk: the two are checked, not used
        _check_chunk(chunk_size)
        _check_max_memory(max_memory)
        return rollout_cam(model_or_split, x, classes, top_k)
    if m.name == "guided_backprop":
        return guided_backprop_cam(model_or_split, x, classes, top_k, chunk_size, max_memory)
    sp = model_or_split if isinstance(model_or_split, Split) else make_split(model_or_split)
    return guided_gradcam_cam(sp, x, classes, top_k, chunk_size, max_memory)


def gradcam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
            relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): channel weights are the spatially averaged gradients.
    x (B, C, H, W) -> maps (B, K, h, w); arguments as ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="gradcam", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def gradcam_max(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
                relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """Grad-CAM with max-pooled gradients as channel weights. x (B, C, H, W) -> maps (B, K, h, w); arguments as
    ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="gradcam_max", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def gradcampp(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
              relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): weights from positive gradients with pixel-wise alphas.
    x (B, C, H, W) -> maps (B, K, h, w); arguments as ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="gradcampp", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def xgradcam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
             relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """XGrad-CAM (Fu et al. 2020, eq. 11): activation-normalised gradient weights. x (B, C, H, W) -> maps
    (B, K, h, w); arguments as ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="xgradcam", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def hirescam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
             relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """HiResCAM (Draelos & Carin 2020, eq. 4): element-wise gradient x activation summed over channels.
    x (B, C, H, W) -> maps (B, K, h, w); arguments as ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="hirescam", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def elementwise(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
                relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """Element-wise Grad-CAM: ReLU(gradient x activation) summed over channels. x (B, C, H, W) -> maps
    (B, K, h, w); arguments as ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="elementwise", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def layercam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
             relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """LayerCAM (Jiang et al. 2021, eq. 5-6): ReLU(gradient) x activation summed over channels.
    x (B, C, H, W) -> maps (B, K, h, w); arguments as ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="layercam", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def argmax_channel(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
                   relu: bool = True, chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """The feature channel with the largest Grad-CAM weight. x (B, C, H, W) -> maps (B, K, h, w); arguments as
    ``funcam.cam``."""
    return cam(model_or_split, x, classes, method="argmax_channel", top_k=top_k, relu=relu, chunk_size=chunk_size,
               max_memory=max_memory).maps


def grad_rollout(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *, top_k: int | None = None,
                 chunk_size: int | None = None, max_memory: int | None = None) -> Tensor:
    """Gradient-weighted attention rollout: x (B, 3, H, W) -> maps (B, K, h, w) on the token grid.

    Per attention layer: Abar = (mean over heads of d score_k / dA * A)^+, then (Abar + I) / 2 rows normalised,
    rolled out in forward order; the readout (CLS) row's patch columns. Any transformer whose attention goes
    through ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` or an explicit softmax; pass
    ``funcam.split(model)`` to reuse its captured graph. classes / top_k / chunk_size as in ``funcam.cam``.
    max_memory: bytes (default 128 MiB) of what the vmapped classes hold at once when ``chunk_size`` is None:
    per class, its gradients at every layer's attention probabilities (B, heads, N, N) and its token activation
    gradients (B, N, width), N = prefix + h*w tokens.
    Differentiable w.r.t. the parameters when grad mode is on (each chunk of classes checkpointed).
    """
    return cam(model_or_split, x, classes, method="grad_rollout", top_k=top_k, chunk_size=chunk_size,
               max_memory=max_memory).maps


def chefer_relevance(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *,
                     top_k: int | None = None, chunk_size: int | None = None,
                     max_memory: int | None = None) -> Tensor:
    """Chefer et al. 2021 relevance: x (B, 3, H, W) -> maps (B, K, h, w) on the token grid.

    R = I; per attention layer in forward order R = R + mean_heads((d score_k / dA * A)^+) @ R; the readout
    (CLS) row's patch columns. Models and arguments (max_memory included) as ``grad_rollout``.
    """
    return cam(model_or_split, x, classes, method="chefer", top_k=top_k, chunk_size=chunk_size,
               max_memory=max_memory).maps


def guided_backprop(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *,
                    top_k: int | None = None, chunk_size: int | None = None,
                    max_memory: int | None = None) -> Tensor:
    """Guided Backprop (Springenberg et al. 2015): x (B, C, H, W) -> gradients (B, K, C, H, W) for K classes.

    d score_k / dx with every ReLU's backward replaced by the guided rule (positive gradient where the forward
    input was positive); the model is not modified. ValueError for a model whose forward calls no ReLU.
    classes / top_k / chunk_size as in ``funcam.cam``. max_memory: bytes (default 128 MiB) of what the vmapped
    classes hold at once when ``chunk_size`` is None: per class, its input gradient (B, C, H, W) and the
    activation gradients of its backward, counted as 64 bytes per byte of x. Call under ``torch.no_grad()``
    unless the gradients themselves must be differentiated.
    """
    return cam(model_or_split, x, classes, method="guided_backprop", top_k=top_k, chunk_size=chunk_size,
               max_memory=max_memory).maps


def guided_gradcam(model_or_split: Split | nn.Module, x: Tensor, classes: Any = None, *,
                   top_k: int | None = None, layer: str | None = None, chunk_size: int | None = None,
                   max_memory: int | None = None) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017, sec. 3.1): x (B, C, H, W) -> (B, K, C, H, W).

    Guided Backprop times Grad-CAM (ReLU'd, at ``layer`` as in ``funcam.split``, or on a given
    ``funcam.split(model, layer)``) upsampled bilinearly to (H, W); both for the same class indices.
    max_memory bounds the Guided Backprop vmap as in ``guided_backprop`` and the Grad-CAM one as in
    ``funcam.gradcam``.
    """
    if isinstance(model_or_split, Split):
        if layer is not None:
            raise ValueError("give layer= to funcam.split, not to guided_gradcam, when it is given a Split")
    else:
        model_or_split = make_split(_guard.unwrap(model_or_split), layer)
    return cam(model_or_split, x, classes, method="guided_gradcam", top_k=top_k, chunk_size=chunk_size,
               max_memory=max_memory).maps
