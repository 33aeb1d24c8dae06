"""Axioms an attribution should satisfy, Quantus 0.6's checks batched over B images x K classes: completeness and
non-sensitivity. Arguments as in ``funcam._src.core.faithfulness``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src import guard as _guard
from funcam._src.core import evaluation as ev

__all__ = ["completeness", "non_sensitivity"]


@_guard.entry(checks=False)
def completeness(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, abs: bool = False,
                 normalise: bool = True, output_func: Callable[[Tensor], Tensor] | None = None,
                 perturb_baseline: Any = "black", softmax: bool = False, rtol: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Completeness (Sundararajan et al. 2017, "Axiomatic attribution for deep networks", ICML, Prop. 1): ``(B, K)``
    bool, whether the map sums to ``output_func(y(x) - y(x'))`` with ``x'`` the all-``perturb_baseline`` input.
    Quantus tests exact equality (``rtol=0``); ``rtol`` accepts ``|sum - delta| <= rtol * |delta|``.
    """
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    b, k = st.classes.shape
    f = x[0].numel()
    groups = x.new_zeros((b, 1, f), dtype=torch.long)
    fill = ev.fill_values(x, groups, 1, perturb_baseline, "single", generator=generator)[:, :1]
    y0 = ev.step_scores(model, st, groups, fill, 1, "single", softmax=softmax, max_memory=None)[..., 0]
    delta = st.y - y0
    if output_func is not None:
        delta = output_func(delta)
    total = st.a.flatten(2).sum(dim=-1)
    return (total - delta.to(torch.float64)).abs() <= rtol * delta.abs().to(torch.float64)


@_guard.entry(checks=False)
def non_sensitivity(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, eps: float = 1e-5,
                    features_in_step: int = 1, abs: bool = True, normalise: bool = True,
                    perturb_baseline: Any = "black", softmax: bool = True, max_memory: int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """Non-sensitivity (Nguyen & Martinez 2020, Sec. 3.1): ``(B, K)`` int64, the number of features for which the
    map and the model disagree: the feature has attribution ``< eps`` xor replacing it (with the other features of
    its step, in flat order, ``features_in_step`` at a time) moves the class score by ``>= eps``. Lower is better.
    Quantus 0.6 needs ``features_in_step=1`` (it compares a per-step with a per-feature array); with more, funcam
    gives each feature its step's score change. The perturbed inputs do not depend on the map: one per image and
    step serves all K classes.
    """
    ev.positive_int(features_in_step, "features_in_step")
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    a = ev.flat_features(st.a, x.shape[1])
    f = a.shape[-1]
    steps = math.ceil(f / features_in_step)
    groups = (torch.arange(f, device=x.device) // features_in_step).expand(x.shape[0], 1, f)
    fill = ev.fill_values(x, groups, steps, perturb_baseline, "single", generator=generator)[:, :1]
    scores = ev.step_scores(model, st, groups, fill, steps, "single", softmax=softmax, max_memory=max_memory)
    insensitive = (scores - st.y.unsqueeze(-1)).abs() < eps  # (B, K, steps)
    return (insensitive.gather(2, groups.expand_as(a)) ^ (a < eps)).sum(dim=-1)
