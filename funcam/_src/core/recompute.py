"""Explanations recomputed inside a metric (robustness, randomisation): the default explainer and one batched call
for many perturbed copies of the images, chunked by ``max_memory``.

An explainer is ``explain_fn(model, x (N, C, H, W), classes (N, K)) -> maps (N, K, h, w) or (N, K, C, H, W)``;
the default is funcam's Grad-CAM (``funcam.gradcam`` at the model's default cut).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src.core import evaluation as ev
from funcam._src.core.cams import gradcam
from funcam._src.core.engine import auto_chunk_size

__all__ = ["gradcam_explainer", "check_explainer", "explain_copies", "predicted", "EXPLAIN_BYTES_PER_INPUT_BYTE"]

# Bytes an explainer keeps alive per input byte: a forward's activations kept for its vjp (funcam counts 64 for the
# guided methods, whose backward runs through the whole network; Grad-CAM keeps the forward graph as well).
EXPLAIN_BYTES_PER_INPUT_BYTE = 64


def gradcam_explainer(model: Callable, x: Tensor, classes: Tensor) -> Tensor:
    """funcam's Grad-CAM maps ``(N, K, h, w)`` at feature resolution, detached: the default ``explain_fn``."""
    return gradcam(model, x, classes).detach()


def check_explainer(explain_fn: Any) -> Callable:
    if explain_fn is None:
        return gradcam_explainer
    if not callable(explain_fn):
        raise TypeError(f"explain_fn must be a callable (model, x, classes) -> maps, got {type(explain_fn).__name__}")
    return explain_fn


def explain_copies(explain_fn: Callable, model: Callable, copies: Tensor, classes: Tensor, *, abs: bool,
                   normalise: bool, max_memory: int | None) -> Tensor:
    """Attributions ``(S, B, K, C', H, W)`` float64 of ``S`` perturbed copies ``(S, B, C, H, W)`` of a batch, for the
    same classes ``(B, K)``: the copies go to ``explain_fn`` as one batch of ``S * B`` images, in chunks of about
    ``max_memory`` bytes; maps are upsampled, normalised and made absolute per map as ``ev.attributions`` (Quantus'
    ``explain_batch``)."""
    s, b = copies.shape[:2]
    flat = copies.reshape((s * b,) + tuple(copies.shape[2:]))
    per = EXPLAIN_BYTES_PER_INPUT_BYTE * flat[0].numel() * flat.element_size()
    chunk = auto_chunk_size(per, s * b, max_memory) or s * b
    out = []
    for i in range(0, s * b, chunk):
        part = flat[i:i + chunk]
        maps = explain_fn(model, part, classes.repeat(s, 1)[i:i + chunk])
        with torch.no_grad():
            out.append(ev.attributions(maps.detach(), part, abs=abs, normalise=normalise))
    return torch.cat(out).view((s, b) + tuple(out[0].shape[1:]))


def predicted(model: Callable, x: Tensor, max_memory: int | None) -> Tensor:
    """Top-1 classes ``(N,)`` of ``x (N, C, H, W)``, in chunks."""
    chunk = ev.chunk_for(x, x.shape[0], max_memory)
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]).argmax(dim=1) for i in range(0, x.shape[0], chunk)])
