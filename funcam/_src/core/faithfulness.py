"""Faithfulness by features perturbed in the order of the map, Quantus 0.6's definitions batched over B images x
K classes and every step: pixel flipping, faithfulness estimate, monotonicity, sensitivity-n.

Every function takes ``model, x (B, C, H, W), maps (B, K, h, w) or (B, K, C, H, W), classes (K,) or (B, K)`` and
Quantus' option names. Features are the ``C*H*W`` values of x; a map per pixel ranks each pixel's C features
together (Quantus broadcasts the map to x's shape). ``features_in_step`` features are perturbed per step, in
the order of the map (ties in flat order). All ``B * K * steps`` perturbed inputs go through the model in chunks
of about ``max_memory`` bytes (``funcam._src.core.evaluation``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src import guard as _guard
from funcam._src.core import evaluation as ev
from funcam._src.core.similarity import similarity_function

__all__ = ["pixel_flipping", "faithfulness_estimate", "monotonicity", "sensitivity_n"]


def _ranked(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, features_in_step: int, abs: bool,
            normalise: bool, softmax: bool, descending: bool) -> tuple[ev.Setup, Tensor, Tensor, int]:
    """Setup, flat attributions ``(B, K, F)``, step of each feature ``(B, K, F)`` and the number of steps."""
    ev.positive_int(features_in_step, "features_in_step")
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    a = ev.flat_features(st.a, x.shape[1])
    steps = math.ceil(a.shape[-1] / features_in_step)
    return st, a, ev.rank_groups(a, features_in_step, descending=descending), steps


@_guard.entry(checks=False)
def pixel_flipping(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, features_in_step: int = 1,
                   abs: bool = False, normalise: bool = True, perturb_baseline: Any = "black", softmax: bool = True,
                   return_auc_per_sample: bool = False, max_memory: int | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """Pixel flipping (Bach et al. 2015, PLoS ONE 10(7), Sec. "Pixel-flipping"): the class score ``(B, K, T)`` after
    each of the ``T = ceil(C*H*W / features_in_step)`` steps that replace the next most relevant features by
    ``perturb_baseline`` (cumulatively); with ``return_auc_per_sample`` its trapezoidal area ``(B, K)``. Lower is
    better. perturb_baseline: 'black' (image minimum), 'white', 'mean' (running mean, as Quantus), a number, or
    'uniform' (one U(0, 1) draw per step, ``generator``). Equals ``quantus.PixelFlipping`` per (image, class).
    """
    st, _, groups, steps = _ranked(model, x, maps, classes, features_in_step=features_in_step, abs=abs,
                                   normalise=normalise, softmax=softmax, descending=True)
    fill = ev.fill_values(x, groups, steps, perturb_baseline, "cumulative", generator=generator)
    curve = ev.step_scores(model, st, groups, fill, steps, "cumulative", softmax=softmax, max_memory=max_memory)
    return ev.trapezoid(curve) if return_auc_per_sample else curve


@_guard.entry(checks=False)
def faithfulness_estimate(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, features_in_step: int = 1,
                          similarity_func: Any = "pearson", abs: bool = False, normalise: bool = True,
                          perturb_baseline: Any = "black", softmax: bool = False, max_memory: int | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Faithfulness estimate (Alvarez-Melis & Jaakkola 2018, "Towards robust interpretability with self-explaining
    neural networks", Sec. 3.1): per (image, class) ``(B, K)``, the correlation over steps between the summed
    attribution of each step's features and the score drop when only those features are replaced (not
    cumulatively). Higher is better. Equals ``quantus.FaithfulnessEstimate`` per (image, class).
    """
    st, a, groups, steps = _ranked(model, x, maps, classes, features_in_step=features_in_step, abs=abs,
                                   normalise=normalise, softmax=softmax, descending=True)
    sim = similarity_function(similarity_func)
    fill = ev.fill_values(x, groups, steps, perturb_baseline, "single", generator=generator)
    scores = ev.step_scores(model, st, groups, fill, steps, "single", softmax=softmax, max_memory=max_memory)
    drops = st.y.unsqueeze(-1).to(torch.float64) - scores.to(torch.float64)
    return sim(ev.group_sums(a, groups, steps), drops).to(x.dtype)


@_guard.entry(checks=False)
def monotonicity(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, features_in_step: int = 1,
                 abs: bool = True, normalise: bool = True, perturb_baseline: Any = "black", softmax: bool = True,
                 max_memory: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Monotonicity (Arya et al. 2019, "One explanation does not fit all", Sec. "Faithfulness metrics", after
    Luss et al. 2019): ``(B, K)`` bool, whether the class score never decreases as the features are added to an
    all-``perturb_baseline`` input from the least to the most relevant, ``features_in_step`` at a time.

    Quantus 0.6's ``Monotonicity`` writes the baseline value of the baseline array into it at every step, so its
    input never changes and it returns True for every map; funcam inserts the image's own features, as the paper
    does (and as Quantus does when given a ``perturb_func`` that inserts x: the test's oracle).
    """
    st, _, groups, steps = _ranked(model, x, maps, classes, features_in_step=features_in_step, abs=abs,
                                   normalise=normalise, softmax=softmax, descending=False)
    fill = ev.fill_values(x, groups, steps, perturb_baseline, "insertion", generator=generator)
    curve = ev.step_scores(model, st, groups, fill, steps, "insertion", softmax=softmax, max_memory=max_memory)
    return (curve.diff(dim=-1) >= 0).all(dim=-1)


@_guard.entry(checks=False)
def sensitivity_n(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, features_in_step: int = 1,
                  n_max_percentage: float = 0.8, similarity_func: Any = "pearson", abs: bool = False,
                  normalise: bool = True, perturb_baseline: Any = "black", softmax: bool = True,
                  max_memory: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sensitivity-n (Ancona et al. 2018, ICLR, Sec. 3.2) as Quantus 0.6 computes it: for each number n of removed
    features (the first ``int(n_max_percentage * H * W // features_in_step)`` steps of cumulative removal in the
    order of the map), the correlation ``(N,)`` across all ``B * K`` (image, class) pairs between the summed
    attribution of the step's features and the score drop. One value per step, not per pair; ``normalise``
    divides all maps by their common largest absolute value. Equals ``quantus.SensitivityN(return_aggregate=False)``
    on the B*K pairs given as one batch (Quantus' default returns the mean over the steps).
    """
    if not 0 < n_max_percentage <= 1:
        raise ValueError(f"n_max_percentage must lie in (0, 1], got {n_max_percentage!r}")
    # the correlation runs across maps, so all of them share one scale: the largest absolute value of all (Quantus
    # normalises the batch it is given as one array)
    st, a, groups, steps = _ranked(model, x, maps, classes, features_in_step=features_in_step, abs=False,
                                   normalise=False, softmax=softmax, descending=True)
    if normalise:
        top = a.abs().amax()
        a = torch.where(top > 0, a / torch.where(top > 0, top, 1.0), a)
    a = a.abs() if abs else a
    if abs:
        groups = ev.rank_groups(a, features_in_step, descending=True)
    sim = similarity_function(similarity_func)
    n = int(n_max_percentage * x.shape[-2] * x.shape[-1] // features_in_step)
    t = min(n, steps)
    fill = ev.fill_values(x, groups, steps, perturb_baseline, "cumulative", generator=generator)[..., :t]
    scores = ev.step_scores(model, st, groups, fill, t, "cumulative", softmax=softmax, max_memory=max_memory)
    drops = st.y.unsqueeze(-1).to(torch.float64) - scores.to(torch.float64)
    sums = ev.group_sums(a, groups, t)  # each step's own features, as Quantus sums them
    b, k = drops.shape[:2]
    return sim(drops.reshape(b * k, t).T, sums.reshape(b * k, t).T).to(x.dtype)
