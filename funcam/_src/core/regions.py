"""Faithfulness by regions (square patches, superpixels) perturbed in turn, Quantus 0.6's definitions batched over
B images x K classes and every step: region perturbation, selectivity, IROF, infidelity.

Arguments as in ``funcam._src.core.faithfulness``. A patch is a ``patch_size`` square of Quantus' grid
(``evaluation.block_groups``: the image padded to a multiple of the patch, the padding split floor / ceil) and
covers every channel; a region's relevance is the sum (patches) or mean (superpixels) of the map inside it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from funcam._src import guard as _guard
from funcam._src.core import evaluation as ev

__all__ = ["region_perturbation", "selectivity", "irof", "infidelity", "superpixels"]

ORDERS = ("morf", "lerf", "random")


def _region_groups(region: Tensor, relevance: Tensor, order: str, generator: torch.Generator | None) -> Tensor:
    """region ``(B or 1, H*W)`` id of each pixel, relevance ``(B, K, R)`` -> step ``(B, K, H*W)`` of each pixel:
    the rank of its region, most relevant first ('morf'), least ('lerf') or in a random order per pair."""
    if order == "random":
        keys = torch.rand(relevance.shape, generator=generator, dtype=torch.float64,
                          device=relevance.device if generator is None else generator.device).to(relevance.device)
        rank = ev.rank_groups(keys, 1, descending=False)
    else:
        rank = ev.rank_groups(relevance, 1, descending=order == "morf")
    b, k, _ = relevance.shape
    return rank.gather(2, region.expand(b, region.shape[-1]).unsqueeze(1).expand(b, k, -1))


def _per_feature(pixel_groups: Tensor, channels: int) -> Tensor:
    """``(B, K, H*W)`` -> ``(B, K, C*H*W)``: a pixel's step for each of its channels."""
    b, k, p = pixel_groups.shape
    return pixel_groups.unsqueeze(2).expand(b, k, channels, p).reshape(b, k, channels * p)


def _patch_curve(model: Callable, x: Tensor, maps: Tensor, classes: Any, patch_size: int, order: str,
                 regions: int | None, abs: bool, normalise: bool, perturb_baseline: Any, softmax: bool,
                 max_memory: int | None, generator: torch.Generator | None) -> tuple[ev.Setup, Tensor]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    b, c, h, w = x.shape
    block, n = ev.block_groups(h, w, patch_size, x.device)
    block = block.reshape(1, h * w)
    pixel_a = st.a.sum(dim=2).flatten(2) * (c if st.a.shape[2] == 1 else 1)  # a map per pixel counts C times
    relevance = ev.group_sums(pixel_a, block.expand(b, st.a.shape[1], -1), n)
    groups = _per_feature(_region_groups(block, relevance, order, generator), c)
    steps = n if regions is None else min(n, ev.positive_int(regions, "regions_evaluation"))
    fill = ev.fill_values(x, groups, n, perturb_baseline, "cumulative", generator=generator)[..., :steps]
    return st, ev.step_scores(model, st, groups, fill, steps, "cumulative", softmax=softmax, max_memory=max_memory)


@_guard.entry(checks=False)
def region_perturbation(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, patch_size: int = 8,
                        order: str = "morf", regions_evaluation: int = 100, abs: bool = False, normalise: bool = True,
                        perturb_baseline: Any = "black", softmax: bool = True, return_auc_per_sample: bool = False,
                        max_memory: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Region perturbation (Samek et al. 2017, IEEE TNNLS 28(11), Sec. III-A, Eq. 12): the score drop ``(B, K, R)``
    ``y(x) - y(x_r)`` after each of the first ``R = regions_evaluation`` patches has been replaced, cumulatively,
    in the order of the map's patch sums ('morf': most relevant first; 'lerf'; 'random' with ``generator``);
    with ``return_auc_per_sample`` its trapezoidal area ``(B, K)`` (higher is better for MoRF). Equals
    ``quantus.RegionPerturbation`` per (image, class).
    """
    st, curve = _patch_curve(model, x, maps, classes, patch_size, order, regions_evaluation, abs, normalise,
                             perturb_baseline, softmax, max_memory, generator)
    drop = st.y.unsqueeze(-1) - curve
    return ev.trapezoid(drop) if return_auc_per_sample else drop


@_guard.entry(checks=False)
def selectivity(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, patch_size: int = 8, abs: bool = False,
                normalise: bool = True, perturb_baseline: Any = "black", softmax: bool = True,
                return_auc_per_sample: bool = False, max_memory: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Selectivity (Montavon et al. 2018, Digital Signal Processing 73, Sec. 4.1): the class score ``(B, K, P)``
    after each of the P patches has been removed, cumulatively, most relevant first; with
    ``return_auc_per_sample`` its trapezoidal area ``(B, K)`` (lower is better). Equals ``quantus.Selectivity``.
    """
    _, curve = _patch_curve(model, x, maps, classes, patch_size, "morf", None, abs, normalise, perturb_baseline,
                            softmax, max_memory, generator)
    return ev.trapezoid(curve) if return_auc_per_sample else curve


def superpixels(x: Tensor, *, segmentation_method: str = "slic") -> Tensor:
    """Segments ``(B, H, W)`` int64 of each image as Quantus' IROF computes them: scikit-image's ``slic(image,
    start_label=0)`` (or ``felzenszwalb(image)``) on the channels-last image in float64, defaults otherwise."""
    try:
        from skimage.segmentation import felzenszwalb, slic
    except ImportError as e:  # an optional dependency (funcam[demo]); irof also takes segments= directly
        raise ImportError("superpixels need scikit-image: pip install 'funcam[demo]', or pass segments=") from e
    if segmentation_method not in ("slic", "felzenszwalb"):
        raise ValueError(f"segmentation_method must be 'slic' or 'felzenszwalb', got {segmentation_method!r}")
    images = x.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    segment = (lambda im: slic(im, start_label=0)) if segmentation_method == "slic" else felzenszwalb
    return torch.from_numpy(np.stack([segment(im) for im in images]).astype(np.int64)).to(x.device)


@_guard.entry(checks=False)
def irof(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, segmentation_method: str = "slic",
         segments: Tensor | None = None, abs: bool = False, normalise: bool = True, perturb_baseline: Any = "mean",
         softmax: bool = True, max_memory: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Iterative removal of features (Rieger & Hansen 2020, "IROF: a low resource evaluation metric for explanation
    methods", Sec. 3): ``(B, K)`` area over the curve of the class score relative to the clean one, ``S - sum_t
    (r_t + r_{t+1}) / 2`` with ``r_t = y(x_t) / y(x)`` as the S superpixels are replaced cumulatively by
    ``perturb_baseline`` ('mean': the running image mean, Quantus' default) in the order of the map's mean in
    each. segments: ``(B, H, W)`` labels ``0..S_b - 1`` (default ``superpixels(x)``). Higher is better. Equals
    ``quantus.IROF`` per (image, class) (whose 'mean' is over the whole batch it is given).
    """
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    b, c, h, w = x.shape
    seg = superpixels(x, segmentation_method=segmentation_method) if segments is None else segments
    if not isinstance(seg, Tensor) or seg.shape != (b, h, w) or seg.is_floating_point():
        raise ValueError(f"segments must be an integer (B, H, W) = {(b, h, w)} tensor, got "
                         f"{tuple(seg.shape) if isinstance(seg, Tensor) else type(seg).__name__}")
    seg = seg.to(x.device, torch.long).reshape(b, 1, h * w).expand(b, st.a.shape[1], h * w)
    counts = seg.amax(dim=-1)[:, 0] + 1  # (B,) segments per image
    n = int(counts.max())
    pixel_a = st.a.mean(dim=2).flatten(2)  # the mean over channels and pixels: a per-pixel map's mean
    means = ev.group_sums(pixel_a, seg, n) / ev.group_sums(torch.ones_like(pixel_a), seg, n).clamp_min(1)
    # segments an image lacks rank last and are never reached: their steps repeat the fully replaced input
    means = torch.where(torch.arange(n, device=x.device) < counts.view(b, 1, 1), means, means.new_tensor(-torch.inf))
    groups = _per_feature(ev.rank_groups(means, 1, descending=True).gather(2, seg), c)
    fill = ev.fill_values(x, groups, n, perturb_baseline, "cumulative", generator=generator)
    curve = ev.step_scores(model, st, groups, fill, n, "cumulative", softmax=softmax, max_memory=max_memory)
    ratio = curve.to(torch.float64) / st.y.unsqueeze(-1).to(torch.float64)
    # the trapezoids between an image's own steps only (its curve has S_b points)
    pairs = (ratio[..., 1:] + ratio[..., :-1]) / 2
    inside = torch.arange(n - 1, device=x.device) < (counts - 1).view(b, 1, 1)
    return (counts.view(b, 1).to(torch.float64) - torch.where(inside, pairs, 0).sum(dim=-1)).to(x.dtype)


@_guard.entry(checks=False)
def infidelity(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, perturb_patch_sizes: Sequence[int] = (4,),
               n_perturb_samples: int = 10, abs: bool = False, normalise: bool = False,
               perturb_baseline: Any = "black", softmax: bool = False, max_memory: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Infidelity (Yeh et al. 2019, NeurIPS, Def. 2.1, Eq. 3) as Quantus 0.6 computes it: ``(B, K)`` the mean over
    steps t of ``(y(x) - y(x_t) - sum_f a_f (x - x_t)_f)^2``, x_t with the first t+1 patches (row-major order)
    replaced by ``perturb_baseline``, averaged over ``perturb_patch_sizes`` and ``n_perturb_samples`` draws (all
    equal for a deterministic baseline: then computed once). Lower is better. The perturbed inputs do not depend
    on the map: one input per image and step serves all K classes. Equals ``quantus.Infidelity``.
    """
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    b, c, h, w = x.shape
    a = ev.flat_features(st.a, c)
    draws = n_perturb_samples if perturb_baseline == "uniform" else 1
    ev.positive_int(n_perturb_samples, "n_perturb_samples")
    losses = []
    for _ in range(draws):
        for p in perturb_patch_sizes:
            block, n = ev.block_groups(h, w, p, x.device)
            groups = _per_feature(block.reshape(1, 1, h * w).expand(b, 1, h * w), c)
            fill = ev.fill_values(x, groups, n, perturb_baseline, "cumulative", generator=generator)[:, :1]
            scores = ev.step_scores(model, st, groups, fill, n, "cumulative", softmax=softmax, max_memory=max_memory)
            flat = x.to(torch.float64).flatten(1).unsqueeze(1)
            change = a * (flat - fill.gather(2, groups.clamp(max=n - 1)))  # (B, K, F): a_f (x_f - x_t,f) once removed
            explained = ev.group_sums(change, groups.expand_as(change), n).cumsum(dim=-1)
            drop = st.y.unsqueeze(-1).to(torch.float64) - scores.to(torch.float64)
            losses.append(((drop - explained) ** 2).mean(dim=-1))
    return torch.stack(losses).mean(dim=0).to(x.dtype)
