"""Explanation quality for B images x K classes: localisation (pointing game, energy in box) and faithfulness
(confidence change, deletion / insertion, ROAD), each returning one value per (image, class).

Every metric takes maps ``(B, K, H, W)`` at input resolution (``funcam.upsample(cam.maps, x.shape[-2:])``
first). Model-based metrics send all perturbed inputs for all images, classes and steps through the model in
chunks of ``chunk_size`` inputs, under ``torch.no_grad``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from funcam._src import guard as _guard
from funcam._src.core.engine import resolve_classes
from funcam._src.core.postprocess import normalize as minmax

__all__ = ["boxes_to_masks", "pointing_game", "energy_in_box", "ConfidenceChange", "confidence_change",
           "DeletionInsertion", "deletion_insertion", "impute", "road"]

SCORES = ("softmax", "logit", "sigmoid")


def _check_maps(maps: Any, size: Sequence[int] | None = None, what: str = "the input") -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 4 or not maps.is_floating_point():
        got = f"{maps.dtype} {tuple(maps.shape)}" if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a floating (B, K, H, W) tensor, got {got}")
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        raise ValueError(f"maps must have the spatial size of {what}, {tuple(size)}, got {tuple(maps.shape[-2:])}; "
                         f"upsample feature-resolution maps first: funcam.upsample(maps, {tuple(size)})")


def boxes_to_masks(boxes: Tensor, size: int | Sequence[int]) -> Tensor:
    """boxes ``(B, K, 4)`` as ``(x0, y0, x1, y1)`` pixel coordinates, end-exclusive -> masks ``(B, K, H, W)`` bool."""
    if not isinstance(boxes, Tensor) or boxes.ndim != 3 or boxes.shape[-1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a (B, K, 4) tensor of (x0, y0, x1, y1), got {got}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ys = torch.arange(h, device=boxes.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=boxes.device).view(1, 1, 1, w)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def _masks(masks: Tensor, maps: Tensor) -> Tensor:
    if isinstance(masks, Tensor) and masks.ndim == 3 and masks.shape[-1] == 4 and masks.shape[:2] == maps.shape[:2]:
        masks = boxes_to_masks(masks, maps.shape[-2:])
    if not isinstance(masks, Tensor) or masks.shape != maps.shape:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks must be (B, K, H, W) = {tuple(maps.shape)} like maps, or boxes (B, K, 4) = "
                         f"{tuple(maps.shape[:2]) + (4,)}; got {got}")
    return masks.bool()


def pointing_game(maps: Tensor, masks: Tensor, *, tolerance: float = 0) -> Tensor:
    """Hits ``(B, K)`` bool: the map's maximum lies within ``tolerance`` pixels (Euclidean) of the mask.

    maps: ``(B, K, H, W)``; masks: ``(B, K, H, W)`` bool, or boxes ``(B, K, 4)`` (see ``boxes_to_masks``).
    The pointing game of Zhang et al. 2016 ("Top-down neural attention by excitation backprop", Sec. 5.1;
    they use a 15 px tolerance). The maximum is the first in row-major order; a constant map has no
    maximum and counts as a miss.
    """
    _check_maps(maps)
    masks = _masks(masks, maps)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance!r}")
    b, k, h, w = maps.shape
    flat = maps.reshape(b, k, h * w)
    idx = flat.argmax(dim=-1)
    py, px = (idx // w).view(b, k, 1, 1), (idx % w).view(b, k, 1, 1)
    ys = torch.arange(h, device=maps.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=maps.device).view(1, 1, 1, w)
    near = (ys - py) ** 2 + (xs - px) ** 2 <= tolerance ** 2
    varies = flat.amax(dim=-1) > flat.amin(dim=-1)
    return (masks & near).flatten(2).any(dim=-1) & varies


def energy_in_box(maps: Tensor, masks: Tensor) -> Tensor:
    """Share ``(B, K)`` of the map's positive mass inside the mask: ``sum(relu(m) * mask) / sum(relu(m))``.

    The energy-based pointing game of Wang et al. 2020 (Score-CAM, Sec. 5.1.2); 0 for a map with no positive mass.
    """
    _check_maps(maps)
    masks = _masks(masks, maps)
    # half-precision sums overflow above 65504 (a 224 x 224 float16 map of values > 1.3): sum in float32
    pos = (maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps).clamp_min(0)
    total = pos.sum(dim=(2, 3))
    inside = (pos * masks).sum(dim=(2, 3))
    # divide only where total > 0 (a subnormal total is a valid denominator; finfo.tiny is not a lower bound)
    share = inside / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, share.clamp(max=1), torch.zeros_like(total)).to(maps.dtype)


def _score(logits: Tensor, score: str) -> Tensor:
    if score == "softmax":
        return logits.softmax(dim=-1)
    if score == "sigmoid":
        return logits.sigmoid()
    return logits


def _setup(model: Callable, x: Tensor, maps: Tensor, classes: Any, score: str,
           chunk_size: int) -> tuple[Tensor, Tensor]:
    """Checks; returns (classes (B, K), scores of the clean input (B, K))."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _check_maps(maps, x.shape[-2:], "x")
    if maps.shape[0] != x.shape[0]:
        raise ValueError(f"maps must have B = {x.shape[0]} maps like x, got shape {tuple(maps.shape)}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    with torch.no_grad():
        logits = model(x)
    if classes is None:
        raise ValueError("classes must be given: the (K,) or (B, K) classes the K maps explain")
    idx = resolve_classes(classes, None, logits)
    if idx.shape != maps.shape[:2]:
        raise ValueError(f"classes must give K = {maps.shape[1]} classes per image like maps, got shape "
                         f"{tuple(idx.shape)}")
    return idx, _score(logits, score).gather(1, idx)


def _run(model: Callable, make: Callable[[Tensor], tuple[Tensor, Tensor]], n: int, score: str, chunk_size: int,
         device: torch.device) -> Tensor:
    """Scores ``(n,)``: ``make(j)`` builds inputs and their target classes for flat indices ``j``, chunk by chunk."""
    out = []
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            inputs, cls = make(torch.arange(s, min(n, s + chunk_size), device=device))
            out.append(_score(model(inputs), score).gather(1, cls[:, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, device=device)


class ConfidenceChange(NamedTuple):
    """drop: ``(B, K)`` relative drop ``relu(Y - O) / Y``; increase: ``(B, K)`` bool ``O > Y``;
    change: ``(B, K)`` ``O - Y``. Y: the class score on x, O: on the explanation-masked input."""
    drop: Tensor
    increase: Tensor
    change: Tensor


@_guard.entry(checks=False)  # training mode: warn, and restore batch-norm statistics afterwards
def confidence_change(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, score: str = "softmax",
                      normalize: bool = True, chunk_size: int = 64) -> ConfidenceChange:
    """Average drop / increase in confidence (Chattopadhyay et al. 2018, Grad-CAM++, Sec. 6.1, Eq. 19-20).

    x: ``(B, C, H, W)``; maps: ``(B, K, H, W)``; classes: ``(K,)`` or ``(B, K)``. Each class's score is
    re-measured on ``x * map`` (the explanation map, min-max normalised per map unless ``normalize=False``).
    Average drop is ``100 * drop.mean()``, increase in confidence ``100 * increase.float().mean()``.
    ``change`` equals pytorch-grad-cam's ``CamMultImageConfidenceChange`` on the same (normalised) maps.
    """
    idx, y = _setup(model, x, maps, classes, score, chunk_size)
    if normalize:
        maps = minmax(maps)
    b, k = idx.shape

    def make(j: Tensor) -> tuple[Tensor, Tensor]:
        bi, ki = j // k, j % k
        return x[bi] * maps[bi, ki].unsqueeze(1), idx[bi, ki]

    o = _run(model, make, b * k, score, chunk_size, x.device).view(b, k)
    return ConfidenceChange((y - o).clamp_min(0) / y, o > y, o - y)


def _baseline(x: Tensor, baseline: str | Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "blur":
        # RISE's insertion substrate (Petsiuk et al. 2018, Sec. 4.1): a Gaussian blur, kernel 11, sigma 5.
        t = torch.arange(11, device=x.device, dtype=x.dtype) - 5
        g = torch.exp(-t ** 2 / (2 * 5.0 ** 2))
        g = g / g.sum()
        c = x.shape[1]
        xp = F.pad(x, (5, 5, 5, 5), mode="reflect" if min(x.shape[-2:]) > 5 else "replicate")
        xp = F.conv2d(xp, g.view(1, 1, 1, 11).expand(c, 1, 1, 11), groups=c)
        return F.conv2d(xp, g.view(1, 1, 11, 1).expand(c, 1, 11, 1), groups=c)
    raise ValueError(f"baseline must be 'zero', 'blur', 'mean' or a tensor broadcastable to x, got {baseline!r}")


class DeletionInsertion(NamedTuple):
    """deletion, insertion: score curves ``(B, K, steps + 1)``; deletion_auc, insertion_auc: ``(B, K)``
    (trapezoidal area over the removed/inserted fraction 0..1; lower deletion and higher insertion is better)."""
    deletion: Tensor
    insertion: Tensor
    deletion_auc: Tensor
    insertion_auc: Tensor


@_guard.entry(checks=False)  # training mode: warn, and restore batch-norm statistics afterwards
def deletion_insertion(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, steps: int = 32,
                       baseline: str | Tensor | tuple = ("zero", "blur"), score: str = "softmax",
                       chunk_size: int = 64) -> DeletionInsertion:
    """Deletion and insertion curves of Petsiuk et al. 2018 (RISE, Sec. 4.1) for every image and class.

    x: ``(B, C, H, W)``; maps: ``(B, K, H, W)``; classes: ``(K,)`` or ``(B, K)``.
    Pixels are ranked by the map (highest first, ties in row-major order). At step ``t`` of ``steps`` the
    first ``t * H * W // steps`` pixels are replaced by the deletion baseline (deletion), or shown on the
    insertion baseline (insertion). baseline: ``(deletion, insertion)`` or one for both, each 'zero',
    'blur' (RISE's substrate), 'mean' (per-channel image mean) or a tensor. The ``2 * B * K * (steps + 1)``
    inputs go through the model ``chunk_size`` at a time.
    """
    idx, _ = _setup(model, x, maps, classes, score, chunk_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    del_b, ins_b = baseline if isinstance(baseline, tuple) else (baseline, baseline)
    bases = torch.stack([_baseline(x, del_b), _baseline(x, ins_b)])  # (2, B, C, H, W)
    b, k, h, w = maps.shape
    order = maps.reshape(b, k, h * w).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(h * w, device=x.device).expand_as(order))
    counts = torch.arange(steps + 1, device=x.device) * (h * w) // steps
    per = b * k * (steps + 1)

    def make(j: Tensor) -> tuple[Tensor, Tensor]:
        mode, r = j // per, j % per
        bi, ki, ti = r // (k * (steps + 1)), (r // (steps + 1)) % k, r % (steps + 1)
        chosen = (rank[bi, ki] < counts[ti, None]).view(-1, 1, h, w)
        base = bases[mode, bi]
        # deletion: the chosen pixels become the baseline; insertion: only the chosen pixels are shown
        keep_x = torch.where((mode == 0).view(-1, 1, 1, 1), ~chosen, chosen)
        return torch.where(keep_x, x[bi], base), idx[bi, ki]

    curves = _run(model, make, 2 * per, score, chunk_size, x.device).view(2, b, k, steps + 1)
    auc = (curves[..., 1:] + curves[..., :-1]).sum(dim=-1) / (2 * steps)
    return DeletionInsertion(curves[0], curves[1], auc[0], auc[1])


def _stencil(dtype: torch.dtype, device: torch.device) -> Tensor:
    # ROAD's noisy linear imputation (Rong et al. 2022, Sec. 4.2): each imputed pixel is the weighted mean of
    # its 8 neighbours, weight 1/6 for the 4 direct and 1/12 for the 4 diagonal ones.
    e, c = 1 / 6, 1 / 12
    return torch.tensor([[c, e, c], [e, 0.0, e], [c, e, c]], dtype=dtype, device=device).view(1, 1, 3, 3)


def impute(x: Tensor, missing: Tensor, *, noise: float = 0.0, generator: torch.Generator | None = None,
           tol: float = 1e-6, max_iter: int = 5000) -> Tensor:
    """Fill ``missing`` pixels of ``x (N, C, H, W)`` (``missing (N, H, W)`` bool) by ROAD's linear imputation.

    Solves, for every missing pixel i, ``s_i u_i - sum_j w_ij u_j = sum_j w_ij v_j`` (missing neighbours j on
    the left, known ones on the right; ``s_i`` the in-image neighbour weights) by conjugate gradients, batched
    over images and channels, then adds ``noise * N(0, 1)`` to the filled pixels. The system is symmetric
    positive definite whenever each missing region touches a known pixel; a fully missing image gets zeros.
    """
    n, c, h, w = x.shape
    k = _stencil(torch.float64, x.device)
    m = missing.to(torch.float64).unsqueeze(1).expand(n, c, h, w).reshape(n * c, 1, h, w)
    v = x.to(torch.float64).reshape(n * c, 1, h, w)
    s = F.conv2d(torch.ones_like(v[:1]), k, padding=1)

    def op(u: Tensor) -> Tensor:
        return m * (s * u - F.conv2d(m * u, k, padding=1))

    rhs = m * F.conv2d((1 - m) * v, k, padding=1)
    u = torch.zeros_like(v)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum(dim=(1, 2, 3), keepdim=True)
    stop = (tol ** 2) * rr.clamp_min(1e-30)
    for it in range(max_iter):
        if it % 16 == 0 and bool((rr <= stop).all()):
            break
        ap = op(p)
        pap = (p * ap).sum(dim=(1, 2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-300), torch.zeros_like(pap))
        u = u + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(dim=(1, 2, 3), keepdim=True)
        p = r + torch.where(rr > 0, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr)) * p
        rr = rr_new
    filled = u.to(x.dtype).view(n, c, h, w)
    if noise:
        filled = filled + noise * torch.randn(filled.shape, generator=generator, dtype=x.dtype,
                                              device=x.device if generator is None else generator.device)
    return torch.where(missing.unsqueeze(1), filled, x)


@_guard.entry(checks=False)  # training mode: warn, and restore batch-norm statistics afterwards
def road(model: Callable, x: Tensor, maps: Tensor, classes: Any, *,
         percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90), order: str = "morf",
         noise: float = 0.01, generator: torch.Generator | None = None, score: str = "softmax",
         chunk_size: int = 64) -> Tensor:
    """ROAD, remove and debias (Rong et al. 2022): score changes ``(B, K, P)`` after imputing the pixels ranked
    most (``order='morf'``) or least (``'lerf'``) relevant, for each of the P ``percentiles`` of pixels removed.

    x: ``(B, C, H, W)``; maps: ``(B, K, H, W)``; classes: ``(K,)`` or ``(B, K)``. Returns
    ``score(imputed) - score(x)`` per image, class and percentile (MoRF: more negative is better; LeRF: closer
    to 0 is better). A pixel is removed when its map value is ``>=`` the ``(100 - p)``-th percentile (linear
    interpolation, as numpy) of the map (MoRF), or of the negated map (LeRF). pytorch-grad-cam's
    ``ROADMostRelevantFirst(percentile=q)`` / ``ROADLeastRelevantFirst(percentile=q)`` is ``p = 100 - q`` here
    (its percentile is the share of pixels kept). Removed pixels are filled by ``impute`` plus ``noise`` times
    standard normal noise (``generator`` for reproducibility).
    """
    idx, y = _setup(model, x, maps, classes, score, chunk_size)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    pct = torch.as_tensor(list(percentiles), dtype=torch.float64)
    if pct.ndim != 1 or len(pct) == 0 or bool(((pct < 0) | (pct > 100)).any()):
        raise ValueError(f"percentiles must be a non-empty sequence of values in [0, 100], got {percentiles!r}")
    b, k, h, w = maps.shape
    ranked = (maps if order == "morf" else -maps).reshape(b, k, h * w).to(torch.float64)
    thr = torch.quantile(ranked, (1 - pct / 100).to(ranked.device), dim=-1, interpolation="linear")  # (P, B, K)
    p = len(pct)
    # (B, K, P, H, W): the removed pixels of each image, class and percentile
    missing = (ranked.unsqueeze(2) >= thr.permute(1, 2, 0).unsqueeze(-1)).view(b, k, p, h, w)
    n = b * k * p
    filled = torch.cat([impute(x[(j := torch.arange(s, min(n, s + chunk_size), device=x.device)) // (k * p)],
                               missing.view(n, h, w)[j], noise=noise, generator=generator)
                        for s in range(0, n, chunk_size)])

    def make(j: Tensor) -> tuple[Tensor, Tensor]:
        return filled[j], idx.reshape(-1)[j // p]

    o = _run(model, make, n, score, chunk_size, x.device).view(b, k, p)
    return o - y.unsqueeze(-1)
