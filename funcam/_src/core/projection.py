"""Principal-component maps: Eigen-CAM, EigenGrad-CAM and ``eigen_smooth``, from one batched SVD.

A map here is the projection of per-channel terms ``T (C, h, w)`` (activations, gradient x activations, weighted
activations) on their first principal component: with ``M (h w, C)`` the terms at every position, mean-centred
over the positions, ``M = U S V^T``, the map is ``M v_1`` (Muhammad & Yeasin 2020, eq. 3-4, as pytorch-grad-cam's
``get_2d_projection`` computes it). One batched ``torch.linalg.svd`` serves every image and class.

Sign. An SVD's singular vectors are defined up to sign (pytorch-grad-cam's maps come out of LAPACK with whichever
sign it gives). funcam fixes it: the map correlates positively with the channel mean of the terms it projects,
``sum_p map_p mean_c T_cp >= 0`` (for Eigen-CAM the mean activation, for ``eigen_smooth`` the channel-weighted map
itself), so a map never comes out inverted and the ReLU that follows keeps the evidence, not its complement.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from funcam._src.base import CAM, Split
from funcam._src.core.atcut import at_cut
from funcam._src.core.engine import class_maps
from funcam._src.core.request import Request
from funcam._src.core.rules import Rule, channel_sum


def first_component(t: Tensor) -> Tensor:
    """terms ``t (N, C, h, w)`` -> their projection on the first principal component, ``(N, h, w)`` (module
    docstring: centred over positions, sign fixed to correlate with ``t.mean(1)``). Half-precision terms are
    projected in float32 (LAPACK has no half SVD) and returned in their dtype."""
    n, c, h, w = t.shape
    work = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    m = t.to(work).reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    centred = m - m.mean(dim=1, keepdim=True)
    # LAPACK fails on a non-finite matrix (features that overflowed): those maps are NaN, for the entry's finite
    # check to name their images, and the SVD runs on zeros in their place
    bad = ~torch.isfinite(centred).flatten(1).all(dim=1)  # (N,)
    centred = torch.where(bad[:, None, None], 0.0, centred)
    v = torch.linalg.svd(centred, full_matrices=False)[2][:, 0]  # (N, C): the first right singular vector
    proj = torch.einsum("npc,nc->np", centred, v)
    # the dot product with the channel mean; a tie (0) keeps the SVD's sign, decided by where, not a branch
    sign = torch.where((proj * m.mean(dim=2)).sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(work)
    return torch.where(bad[:, None], torch.nan, proj * sign).view(n, h, w).to(t.dtype)


def _projected(terms: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda g, a: first_component(terms(g, a))


def _weighted_terms(weights: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda g, a: weights(g, a)[:, :, None, None] * a


def smoothed(rule: Rule) -> Rule:
    """``rule`` with ``eigen_smooth``: the first principal component of its per-channel terms instead of their sum
    (pytorch-grad-cam's ``get_2d_projection(weighted_activations)``), per image and class, on the engine's general
    path. Raises ValueError for a rule whose map is not a sum of channel terms (argmax_channel: one channel)."""
    terms = rule.terms if rule.terms is not None else _weighted_terms(rule.weights) if rule.weights else None
    if terms is None:
        raise ValueError("eigen_smooth applies to maps that are a sum of per-channel terms (Grad-CAM, HiResCAM, ...); "
                         "this method's map is not (argmax_channel shows one channel)")
    return Rule(_projected(terms))


def weighted_maps(w: Tensor, a: Tensor, req: Request) -> Tensor:
    """``sum_c w_kc A_c`` (B, K, h, w) for channel weights ``w (B, K, C)`` and ``A (B, C, h, w)``; with the
    request's ``eigen_smooth``, the first principal component of the weighted activations ``w_kc A_c`` instead,
    ``max_memory`` classes' ``(B, C, h, w)`` terms at a time."""
    if not req.options.get("eigen_smooth", False):
        return channel_sum(w, a)
    b, k = w.shape[:2]
    step = req.chunk(a.numel() * a.element_size() * 3, k) or max(k, 1)
    parts = [first_component((ws[..., None, None] * a[:, None]).flatten(0, 1)).view(b, ws.shape[1], *a.shape[2:])
             for ws in w.split(step, dim=1)]
    return torch.cat(parts, dim=1) if parts else a.new_zeros((b, 0) + tuple(a.shape[2:]))


def eigen_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """Eigen-CAM (Muhammad & Yeasin 2020; pytorch-grad-cam's ``EigenCAM``): the first principal component of the
    activations ``A (B, C, h, w)`` at the cut, ``(B, K, h, w)``: one map per image, the same for every requested
    class (class-agnostic), from one forward and one batched SVD. A split at several levels (a detector's FPN, as
    pytorch-grad-cam's detector tutorials use Eigen-CAM) gives one such map per level, a tuple as Grad-CAM's there."""
    cut = at_cut(split, x, req, "eigencam", levels=True)
    k = cut.idx.shape[1]
    maps = tuple(first_component(a).unsqueeze(1).expand(-1, k, -1, -1) for a in cut.feats.maps)
    return CAM(maps[0] if len(maps) == 1 else maps, cut.picked, cut.logits)


def _gradient_terms(g: Tensor, a: Tensor) -> Tensor:
    return g * a


def _pooled_eigengrad(v: Tensor, a: Tensor) -> Tensor:
    """EigenGrad-CAM for a spatially constant gradient ``v (B, K, C)``: the terms ``v_kc A_c``."""
    b, k = v.shape[:2]
    return first_component((v[..., None, None] * a[:, None]).flatten(0, 1)).view(b, k, *a.shape[2:])


# pytorch-grad-cam's EigenGradCAM: get_2d_projection(grads * activations), per class; the pooled form for heads
# that start with global average pooling
EIGENGRAD = Rule(_projected(_gradient_terms), None, _pooled_eigengrad)


def eigen_grad_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """EigenGrad-CAM (pytorch-grad-cam's ``EigenGradCAM``): the first principal component of gradient x activations
    ``d s_k / dA * A`` per image and class, ``(B, K, h, w)``, the gradients from the engine's vmapped vjp."""
    return class_maps(split, x, req, EIGENGRAD)
