"""Complexity of the maps themselves, Quantus 0.6's definitions batched over B images x K classes: sparseness
(Gini index), complexity (entropy), effective complexity (count above a threshold). No model is run.

Each takes ``model, x (B, C, H, W), maps (B, K, h, w) or (B, K, C, H, W), classes`` like every other metric (the
model and classes are unused; x gives the resolution the maps are upsampled to) and returns ``(B, K)``. The
features are the map's own values at input resolution (``H*W``, or ``C*H*W`` for input attributions), after
Quantus' ``normalise`` (divide by the largest absolute value) and ``abs`` (both on by default here).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src.core import evaluation as ev

__all__ = ["sparseness", "complexity", "effective_complexity", "discrete_entropy"]


def _flat(x: Tensor, maps: Tensor, abs: bool, normalise: bool) -> Tensor:
    return ev.setup(None, x, maps, None, abs=abs, normalise=normalise).a.flatten(2)  # (B, K, n)


def sparseness(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, abs: bool = True,
               normalise: bool = True) -> Tensor:
    """Sparseness (Chalasani et al. 2020, ICML, Sec. 5.1): the Gini index ``(B, K)`` of each map,
    ``sum_i (2i - n - 1) a_(i) / (n sum_i a_(i))`` over its n values sorted ascending, each shifted by 1e-7 as
    Quantus does. 1 for a single non-zero value, 0 for a constant map: higher is sparser.
    """
    a = (_flat(x, maps, abs, normalise) + 1e-7).sort(dim=-1).values
    n = a.shape[-1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    return (((2 * i - n - 1) * a).sum(dim=-1) / (n * a.sum(dim=-1))).to(x.dtype)


def complexity(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, abs: bool = True,
               normalise: bool = True) -> Tensor:
    """Complexity (Bhatt et al. 2020, IJCAI, Sec. 4, "Complexity"): the entropy ``(B, K)`` of each map's
    fractional contributions ``p_i = a_i / sum_j |a_j|``, ``-sum_i p_i log(p_i + 1e-12)``. Lower is simpler."""
    a = _flat(x, maps, abs, normalise)
    p = a / a.abs().sum(dim=-1, keepdim=True)
    return (-(p * torch.log(p + 1e-12)).sum(dim=-1)).to(x.dtype)


def effective_complexity(model: Callable | None, x: Tensor, maps: Tensor, classes: Any = None, *, eps: float = 1e-5,
                         abs: bool = True, normalise: bool = True) -> Tensor:
    """Effective complexity (Nguyen & Martinez 2020, "On quantitative aspects of model interpretability", Sec.
    3.2): the number ``(B, K)`` int64 of map values above ``eps``. Lower is simpler."""
    return (_flat(x, maps, abs, normalise) > eps).sum(dim=-1)


def discrete_entropy(a: Tensor, n_bins: int = 100) -> Tensor:
    """The entropy ``(...)`` (natural log) of each row's histogram, a ``(..., n)``, over ``n_bins`` equal bins from
    its minimum to its maximum: ``scipy.stats.entropy(np.histogram(row, bins=n_bins)[0])``, numpy's bin edges and
    edge corrections included (a constant row: bins around the value, all in one)."""
    a = a.to(torch.float64)
    lo, hi = a.amin(dim=-1, keepdim=True), a.amax(dim=-1, keepdim=True)
    flat = hi == lo
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    bin_of = ((a - lo) * (n_bins / (hi - lo))).floor().long().clamp(0, n_bins - 1)
    # numpy's corrections where float rounding put a value in the wrong bin: edges are linspace(lo, hi, n + 1)
    i = torch.arange(n_bins + 1, device=a.device, dtype=torch.float64)
    edges = i * ((hi - lo) / n_bins) + lo  # (..., n_bins + 1), as np.linspace: i * step + start, the last one stop
    edges = torch.cat([edges[..., :-1], hi], dim=-1)
    bin_of = bin_of - (a < edges.gather(-1, bin_of)).long()
    bin_of = bin_of + ((a >= edges.gather(-1, bin_of + 1)) & (bin_of != n_bins - 1)).long()
    counts = torch.zeros(a.shape[:-1] + (n_bins,), device=a.device, dtype=torch.float64)
    counts.scatter_add_(-1, bin_of, torch.ones_like(a))
    p = counts / counts.sum(dim=-1, keepdim=True)
    return -(torch.where(p > 0, p * p.log(), p.new_zeros(()))).sum(dim=-1)
