"""Occlusion (Zeiler & Fergus 2014, sec. 4.2; captum's ``Occlusion``) for B images x K classes.

A window of shape (c, h, w) slides over x (C, H, W) with the given strides; at each of its P positions the window is
set to the baseline and the scores fall by ``d_pk = s_k(x) - s_k(x occluded at p)``. Each input element's
attribution is the mean drop over the positions whose window covers it: ``sum_p d_pk M_p / sum_p M_p`` (captum's
Occlusion: FeatureAblation with its mask weights). Forward passes only, P * B images in chunks under
``max_memory`` (captum's ``perturbations_per_eval``); one forward per occluded copy gives all K classes (captum asks
one target per call, so K * P * B forwards).

The positions along each axis are captum's: ``ceil((D - window) / stride) + 1`` of them, starting at multiples of
the stride, the last window cut at the edge. The window is the outer product of one interval per axis, so both sums
over P are products of three small (positions, D) membership matrices (one einsum), never a (P, C, H, W) mask.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcam._src.base import CAM, Split
from funcam._src.core.attributions import SAMPLE_BYTES_PER_INPUT_BYTE, as_baseline, baselines_check, forward_of
from funcam._src.core.engine import class_indices, sample_scores
from funcam._src.core.request import DEFAULT_MAX_MEMORY, Option, Request


def memberships(size: int, window: int, stride: int, like: Tensor) -> Tensor:
    """(n, size) in ``like``'s dtype and device: row i is 1 on [i * stride, i * stride + window) (cut at size),
    for captum's n = ceil((size - window) / stride) + 1 window positions."""
    n = -(-(size - window) // stride) + 1
    start = torch.arange(n, device=like.device)[:, None] * stride
    t = torch.arange(size, device=like.device)
    return ((t >= start) & (t < start + window)).to(like.dtype)


def as_triple(value: int | tuple[int, ...], first: int) -> tuple[int, int, int]:
    """An option given as k: (first, k, k); as (h, w): (first, h, w); a (c, h, w) tuple as it is."""
    if isinstance(value, int):
        return (first, value, value)
    return (first, *value) if len(value) == 2 else tuple(value)


def window_geometry(shape: tuple[int, int, int], window: Any, strides: Any) -> tuple[tuple[int, ...], ...]:
    """((c, h, w) window, (c, h, w) strides) for x's (C, H, W) ``shape``; an int or (h, w) window spans every
    channel, an int or (h, w) stride steps one channel. Raises where captum asserts: a window larger than x, or a
    stride larger than its window (elements no window covers would have no attribution)."""
    win, step = as_triple(window, shape[0]), as_triple(strides, 1)
    if any(w > d for w, d in zip(win, shape)):
        raise ValueError(f"sliding_window_shapes must fit in x's (C, H, W) = {shape}, got {win}")
    if any(s > w and w < d for s, w, d in zip(step, win, shape)):
        raise ValueError(f"strides must not exceed sliding_window_shapes {win} along an axis the window does not "
                         f"span (elements would be left uncovered), got {step}")
    return win, step


def occlusion_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """Occlusion (Zeiler & Fergus 2014, sec. 4.2; captum's ``Occlusion``): the mean score drop over the occluded
    windows covering each input element, ``(B, K, C, H, W)`` (see the module docstring).

    The occluded forwards run without a graph (P * B of them would keep P * B images' activations): the maps are
    not differentiable; the logits of x itself are.
    """
    forward = forward_of(target)
    b, shape = x.shape[0], tuple(x.shape[1:])
    win, step = window_geometry(shape, req.options["sliding_window_shapes"], req.options["strides"])
    base = as_baseline(x, req.options["baselines"])
    scores, logits = sample_scores(forward(x), 1, b, req)
    idx, picked = class_indices(scores, logits, req, b)
    k = idx.shape[1]
    if k == 0:
        return CAM(x.new_zeros((b, 0) + shape), picked, logits)
    at_x = (scores if req.score_fn is not None else scores.gather(1, idx)).detach()  # (B, K)
    mc, mh, mw = (memberships(d, w, s, x) for d, w, s in zip(shape, win, step))
    with torch.no_grad():
        drops = score_drops(forward, x, base, at_x, idx, (mc, mh, mw), req)  # (Pc, Ph, Pw, B, K)
    total = torch.einsum("ijlbk,ic,jh,lw->bkchw", drops, mc, mh, mw)
    count = torch.einsum("ic,jh,lw->chw", mc, mh, mw)  # >= 1 everywhere: window_geometry's stride check
    return CAM(total / count, picked, logits)


def score_drops(forward: Any, x: Tensor, base: Tensor, at_x: Tensor, idx: Tensor, members: tuple[Tensor, ...],
                req: Request) -> Tensor:
    """``s_k(x) - s_k(x occluded at p)`` (Pc, Ph, Pw, B, K) for every window position p, p * B occluded images
    per forward: as many positions as ``max_memory`` holds at ``SAMPLE_BYTES_PER_INPUT_BYTE`` per image (what a
    vjp would keep; a forward without a graph keeps less, so an upper bound)."""
    mc, mh, mw = members
    nc, nh, nw = mc.shape[0], mh.shape[0], mw.shape[0]
    n, b = nc * nh * nw, x.shape[0]
    budget = DEFAULT_MAX_MEMORY if req.max_memory is None else req.max_memory
    per_forward = max(1, min(n, budget // max(1, b * SAMPLE_BYTES_PER_INPUT_BYTE * x[:1].numel() * x.element_size())))
    drops = []
    for lo in range(0, n, per_forward):
        p = torch.arange(lo, min(n, lo + per_forward), device=x.device)
        ic, ih, iw = p // (nh * nw), (p // nw) % nh, p % nw
        m = (mc[ic][:, :, None, None] * mh[ih][:, None, :, None] * mw[iw][:, None, None, :]).unsqueeze(1)
        occluded = x * (1 - m) + base * m  # (p, B, C, H, W), as captum forms its ablated inputs
        out, _ = sample_scores(forward(occluded.flatten(0, 1)), p.shape[0], b, req)
        out = out.unflatten(0, (p.shape[0], b))  # (p, B, N) logits or (p, B, K) scores
        if req.score_fn is None:
            out = out.gather(2, idx.expand(p.shape[0], -1, -1))
        drops.append(at_x - out)
    return torch.cat(drops).view(nc, nh, nw, b, at_x.shape[1])


def _window_check(name: str) -> Any:
    def check(v: Any) -> int | tuple[int, ...]:
        def positive(t: Any) -> bool:
            return isinstance(t, int) and not isinstance(t, bool) and t >= 1

        if positive(v) or (isinstance(v, tuple) and len(v) in (2, 3) and all(positive(t) for t in v)):
            return v
        raise ValueError(f"{name} must be a positive int k (k x k), an (h, w) or a (c, h, w) tuple of positive ints, "
                         f"got {v!r}")
    return check


OCCLUSION_OPTIONS = (
    Option("sliding_window_shapes", 16, _window_check("sliding_window_shapes"), "the occluded window: k (all "
           "channels, k x k), (h, w) (all channels) or (c, h, w), as captum's sliding_window_shapes", int),
    Option("strides", 8, _window_check("strides"), "the window's step: k (k x k), (h, w) or (c, h, w), as captum's "
           "strides (at most the window)", int),
    Option("baselines", None, baselines_check, "what the window is set to: None (zeros), a number, or a tensor "
           "broadcastable to x"),
)
