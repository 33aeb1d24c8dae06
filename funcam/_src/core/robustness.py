"""Robustness of explanations to small input noise, Quantus 0.6's definitions batched over B images x K classes
and every noise draw: max-sensitivity, average sensitivity, local Lipschitz estimate.

Arguments as in ``funcam._src.core.faithfulness``, plus ``explain_fn(model, x, classes) -> maps`` (default
funcam's Grad-CAM) that recomputes the maps on the noisy copies: all ``nr_samples`` copies of the B images go to
it as one batch (in chunks of about ``max_memory`` bytes), each with the K classes. The noise comes from ``draws``
``(nr_samples, B, C, H, W)`` or ``generator``; a copy of an image serves its K classes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src import guard as _guard
from funcam._src.core import evaluation as ev
from funcam._src.core.recompute import check_explainer, explain_copies, predicted

__all__ = ["max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate"]


def _noise(x: Tensor, nr_samples: int, draws: Tensor | None, make: Callable[[tuple, Any], Tensor],
           generator: torch.Generator | None) -> Tensor:
    ev.positive_int(nr_samples, "nr_samples")
    shape = (nr_samples,) + tuple(x.shape)
    if draws is None:
        draws = make(shape, generator)
    if tuple(draws.shape) != shape:
        raise ValueError(f"draws must have shape (nr_samples, B, C, H, W) = {shape}, got {tuple(draws.shape)}")
    return draws.to(x.device, x.dtype)


def _uniform(lower_bound: float, upper_bound: float | None, x: Tensor) -> Callable[[tuple, Any], Tensor]:
    # Quantus' batch_uniform_noise: U(-lower, lower) without an upper bound, else U(lower, upper)
    lo, hi = (-lower_bound, lower_bound) if upper_bound is None else (lower_bound, upper_bound)

    def make(shape: tuple, generator: torch.Generator | None) -> Tensor:
        dev = x.device if generator is None else generator.device
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64, device=dev)
    return make


def _sensitivities(model: Callable, x: Tensor, maps: Tensor, classes: Any, noise: Tensor, explain_fn: Any,
                   abs: bool, normalise: bool, return_nan_when_prediction_changes: bool, max_memory: int | None,
                   measure: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """``(S, B, K)``: ``measure(a (B, K, n), a_s (S, B, K, n), dx (S, B, F))`` for every noisy copy ``x + noise[s]``,
    NaN where the copy changes the top-1 class when ``return_nan_when_prediction_changes``."""
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise)
    copies = x.unsqueeze(0) + noise
    a_s = explain_copies(check_explainer(explain_fn), model, copies, st.classes, abs=abs, normalise=normalise,
                         max_memory=max_memory)
    s, b = copies.shape[:2]
    dx = (x.unsqueeze(0) - copies).flatten(2).to(torch.float64)
    out = measure(st.a.flatten(2), a_s.flatten(3), dx)
    if return_nan_when_prediction_changes:
        top = predicted(model, x, max_memory)
        changed = predicted(model, copies.flatten(0, 1), max_memory).view(s, b) != top
        out = torch.where(changed.unsqueeze(-1), torch.full_like(out, float("nan")), out)
    return out


def _relative_change(a: Tensor, a_s: Tensor, dx: Tensor) -> Tensor:
    # Quantus' defaults: similarity 'difference', Frobenius norms over the flattened map
    return (a.unsqueeze(0) - a_s).norm(dim=-1) / a.norm(dim=-1).unsqueeze(0)


@_guard.entry(checks=False)
def max_sensitivity(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, nr_samples: int = 200,
                    lower_bound: float = 0.2, upper_bound: float | None = None, abs: bool = False,
                    normalise: bool = False, return_nan_when_prediction_changes: bool = False,
                    explain_fn: Callable | None = None, draws: Tensor | None = None,
                    generator: torch.Generator | None = None, max_memory: int | None = None) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019, NeurIPS, Def. 3.1): ``(B, K)`` the largest relative change of the map,
    ``|a - a(x + e)|_2 / |a|_2``, over ``nr_samples`` uniform noise draws e (Quantus' ``batch_uniform_noise``:
    U(-lower_bound, lower_bound), or U(lower_bound, upper_bound)). Lower is better."""
    noise = _noise(x, nr_samples, draws, _uniform(lower_bound, upper_bound, x), generator)
    out = _sensitivities(model, x, maps, classes, noise, explain_fn, abs, normalise,
                         return_nan_when_prediction_changes, max_memory, _relative_change)
    return (out.amax(dim=0) if return_nan_when_prediction_changes else out.nan_to_num(nan=-torch.inf).amax(dim=0)
            .nan_to_num(neginf=float("nan"))).to(x.dtype)


@_guard.entry(checks=False)
def avg_sensitivity(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, nr_samples: int = 200,
                    lower_bound: float = 0.2, upper_bound: float | None = None, abs: bool = False,
                    normalise: bool = False, return_nan_when_prediction_changes: bool = False,
                    explain_fn: Callable | None = None, draws: Tensor | None = None,
                    generator: torch.Generator | None = None, max_memory: int | None = None) -> Tensor:
    """Average sensitivity (Yeh et al. 2019, NeurIPS, Sec. 3, after Bhatt et al. 2020): ``(B, K)`` the mean relative
    change of the map over the noise draws of ``max_sensitivity`` (NaN draws left out). Lower is better."""
    noise = _noise(x, nr_samples, draws, _uniform(lower_bound, upper_bound, x), generator)
    out = _sensitivities(model, x, maps, classes, noise, explain_fn, abs, normalise,
                         return_nan_when_prediction_changes, max_memory, _relative_change)
    return (out.mean(dim=0) if return_nan_when_prediction_changes else out.nanmean(dim=0)).to(x.dtype)


@_guard.entry(checks=False)
def local_lipschitz_estimate(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, nr_samples: int = 200,
                             perturb_mean: float = 0.0, perturb_std: float = 0.1, abs: bool = False,
                             normalise: bool = True, return_nan_when_prediction_changes: bool = False,
                             explain_fn: Callable | None = None, draws: Tensor | None = None,
                             generator: torch.Generator | None = None, max_memory: int | None = None) -> Tensor:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018, "On the robustness of interpretability methods",
    Eq. 5): ``(B, K)`` the largest ``|a - a(x + e)|_2 / (|e|_2 + 1e-10)`` over ``nr_samples`` Gaussian draws
    ``e ~ N(perturb_mean, perturb_std^2)`` (Quantus' ``batch_gaussian_noise``). Lower is better."""
    def gaussian(shape: tuple, generator: torch.Generator | None) -> Tensor:
        dev = x.device if generator is None else generator.device
        return perturb_mean + perturb_std * torch.randn(shape, generator=generator, dtype=torch.float64, device=dev)

    def lipschitz(a: Tensor, a_s: Tensor, dx: Tensor) -> Tensor:
        return (a.unsqueeze(0) - a_s).norm(dim=-1) / (dx.norm(dim=-1).unsqueeze(-1) + 1e-10)

    noise = _noise(x, nr_samples, draws, gaussian, generator)
    out = _sensitivities(model, x, maps, classes, noise, explain_fn, abs, normalise,
                         return_nan_when_prediction_changes, max_memory, lipschitz)
    return (out.amax(dim=0) if return_nan_when_prediction_changes else out.nan_to_num(nan=-torch.inf).amax(dim=0)
            .nan_to_num(neginf=float("nan"))).to(x.dtype)
