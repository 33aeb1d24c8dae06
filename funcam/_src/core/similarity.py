"""Similarities between batches of vectors, as the Quantus metrics use them: ``(..., n), (..., n) -> (...)``.

Each equals its scipy / scikit-image counterpart on every row (``scipy.stats.pearsonr``, ``spearmanr`` with
average ranks for ties, ``skimage.metrics.structural_similarity`` on a 1-D signal), batched over the leading
dimensions. A constant row has no correlation: NaN, as scipy returns (with a warning there).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pearson", "spearman", "ssim", "average_ranks", "similarity_function", "SIMILARITIES"]


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson's r of each row, ``sum(a' b') / (|a'| |b'|)`` with ``a' = a - mean(a)`` (scipy's pearsonr: each
    centred row is scaled to unit norm first, which keeps large values from overflowing); clipped to [-1, 1]."""
    a, b = torch.broadcast_tensors(a.to(torch.float64), b.to(torch.float64))
    am = a - a.mean(dim=-1, keepdim=True)
    bm = b - b.mean(dim=-1, keepdim=True)
    na, nb = am.norm(dim=-1, keepdim=True), bm.norm(dim=-1, keepdim=True)
    r = ((am / na) * (bm / nb)).sum(dim=-1)
    # scipy: a constant row (zero norm after centring) has no correlation
    return torch.where((na[..., 0] > 0) & (nb[..., 0] > 0), r.clamp(-1, 1), torch.full_like(r, float("nan")))


def average_ranks(v: Tensor) -> Tensor:
    """Ranks 1..n of each row, tied values sharing their average rank (``scipy.stats.rankdata``)."""
    s = v.sort(dim=-1).values.contiguous()
    v = v.contiguous()
    lo = torch.searchsorted(s, v, right=False)
    hi = torch.searchsorted(s, v, right=True)
    return (lo + hi + 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rho of each row: Pearson's r of the average ranks (``scipy.stats.spearmanr``)."""
    a, b = torch.broadcast_tensors(a.to(torch.float64), b.to(torch.float64))
    return pearson(average_ranks(a), average_ranks(b))


def ssim(a: Tensor, b: Tensor, *, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean structural similarity of each row as a 1-D signal (Wang et al. 2004, Eq. 13), exactly as Quantus'
    ``ssim`` calls ``skimage.metrics.structural_similarity(a, b, data_range=max - min of both)``.

    Uniform ``win_size`` windows with the sample covariance (``N / (N - 1)``); the mean over the positions at
    least ``(win_size - 1) / 2`` from either end (skimage crops that border, so its padding never matters).
    """
    a, b = torch.broadcast_tensors(a.to(torch.float64), b.to(torch.float64))
    shape, n = a.shape[:-1], a.shape[-1]
    if n < win_size:
        raise ValueError(f"ssim needs vectors of at least win_size = {win_size} values, got {n}")
    x, y = a.reshape(-1, 1, n), b.reshape(-1, 1, n)
    data_range = (torch.maximum(x.amax(dim=-1), y.amax(dim=-1)) - torch.minimum(x.amin(dim=-1), y.amin(dim=-1)))
    kernel = x.new_full((1, 1, win_size), 1.0 / win_size)

    def mean(t: Tensor) -> Tensor:  # windows that lie fully inside the signal: the cropped positions
        return F.conv1d(t, kernel)

    ux, uy = mean(x), mean(y)
    cov = win_size / (win_size - 1)
    vx = cov * (mean(x * x) - ux * ux)
    vy = cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1 = ((k1 * data_range) ** 2)[..., None]
    c2 = ((k2 * data_range) ** 2)[..., None]
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=-1).reshape(shape)


SIMILARITIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"pearson": pearson, "spearman": spearman,
                                                                "ssim": ssim}


def similarity_function(value: Any, name: str = "similarity_func") -> Callable[[Tensor, Tensor], Tensor]:
    """A name of ``SIMILARITIES`` or a callable ``(a (..., n), b (..., n)) -> (...)`` -> the callable."""
    if callable(value):
        return value
    if value in SIMILARITIES:
        return SIMILARITIES[value]
    raise ValueError(f"{name} must be one of {sorted(SIMILARITIES)} or a callable (a, b) -> similarity, got {value!r}")
