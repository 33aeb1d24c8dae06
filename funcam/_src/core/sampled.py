"""Faithfulness from random perturbations, Quantus 0.6's definitions batched over B images x K classes and every
draw: faithfulness correlation (random feature subsets) and monotonicity correlation (repeated baseline draws).

Arguments as in ``funcam._src.core.faithfulness``. The random draws come from ``generator`` or are passed as
``draws`` (the same draws give the same numbers: the tests pass Quantus' own numpy draws); the draws of one image
serve its K classes.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from funcam._src import guard as _guard
from funcam._src.core import evaluation as ev
from funcam._src.core.similarity import similarity_function

__all__ = ["faithfulness_correlation", "monotonicity_correlation"]


def _subsets(b: int, f: int, runs: int, size: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``(runs, B, size)`` feature indices, each row a uniform random subset without replacement."""
    dev = device if generator is None else generator.device
    return torch.stack([torch.rand((b, f), generator=generator, device=dev).topk(size, dim=1).indices
                        for _ in range(runs)]).to(device)


@_guard.entry(checks=False)
def faithfulness_correlation(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, nr_runs: int = 100,
                             subset_size: int = 224, similarity_func: Any = "pearson", abs: bool = False,
                             normalise: bool = True, perturb_baseline: Any = "black", softmax: bool = False,
                             draws: Tensor | None = None, generator: torch.Generator | None = None,
                             max_memory: int | None = None) -> Tensor:
    """Faithfulness correlation (Bhatt et al. 2020, IJCAI, Sec. 4, "Faithfulness", Eq. 2): ``(B, K)`` the correlation
    over ``nr_runs`` random subsets of ``subset_size`` features between the subset's summed attribution and the
    score drop when only the subset is replaced by ``perturb_baseline``. Higher is better.

    draws: ``(nr_runs, B, subset_size)`` feature indices into x's flat ``C*H*W`` features (default: drawn with
    ``generator``). The perturbed inputs do not depend on the map: one per image and run serves all K classes.
    """
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    ev.positive_int(nr_runs, "nr_runs")
    b, c, h, w = x.shape
    f = c * h * w
    if not 0 < subset_size < f:
        raise ValueError(f"subset_size must lie in [1, {f}) (the features of x), got {subset_size!r}")
    idx = _subsets(b, f, nr_runs, subset_size, generator, x.device) if draws is None else draws.to(x.device).long()
    if idx.shape != (nr_runs, b, subset_size):
        raise ValueError(f"draws must have shape (nr_runs, B, subset_size) = {(nr_runs, b, subset_size)}, got "
                         f"{tuple(idx.shape)}")
    fill = ev.baseline_value(x, perturb_baseline)
    k = st.classes.shape[1]

    def make(j: Tensor) -> tuple[Tensor, Tensor]:
        ri, bi = j // b, j % b
        flat = x[bi].flatten(1).clone()
        flat.scatter_(1, idx[ri, bi], fill[bi, None].expand(-1, subset_size).to(flat.dtype))
        return flat.view(-1, c, h, w), st.classes[bi]

    scores = ev.predict(model, make, nr_runs * b, x, softmax=softmax, max_memory=max_memory)  # (runs * B, K)
    drops = st.y.to(torch.float64).unsqueeze(-1) - scores.view(nr_runs, b, k).permute(1, 2, 0).to(torch.float64)
    a = ev.flat_features(st.a, c)
    sums = a.gather(2, idx.permute(1, 0, 2).reshape(b, 1, -1).expand(b, k, -1)).view(b, k, nr_runs, subset_size)
    return similarity_function(similarity_func)(sums.sum(dim=-1), drops).to(x.dtype)


@_guard.entry(checks=False)
def monotonicity_correlation(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, nr_samples: int = 100,
                             features_in_step: int = 1, eps: float = 1e-5, similarity_func: Any = "spearman",
                             abs: bool = True, normalise: bool = True, perturb_baseline: Any = "uniform",
                             softmax: bool = True, draws: Tensor | None = None,
                             generator: torch.Generator | None = None, max_memory: int | None = None) -> Tensor:
    """Monotonicity correlation (Nguyen & Martinez 2020, Sec. 3.2, "Monotonicity"): ``(B, K)`` the rank correlation
    over steps between the summed attribution of each step's features (least relevant first, ``features_in_step``
    at a time) and the variance of the score when only they are replaced, ``mean_s (y(x_s) - y(x))^2 / y(x)^2``
    over ``nr_samples`` draws of the baseline (``1 / y^2`` taken as 1 when ``|y| < eps``). Higher is better.

    perturb_baseline 'uniform' (Quantus' default): one U(0, 1) value per step, draw and image, from ``draws``
    ``(steps, nr_samples, B)`` or ``generator``; a deterministic baseline ('black', ...) makes all draws equal,
    and the step is then scored once.
    """
    ev.positive_int(nr_samples, "nr_samples")
    ev.positive_int(features_in_step, "features_in_step")
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise, softmax=softmax)
    b = x.shape[0]
    a = ev.flat_features(st.a, x.shape[1])
    steps = math.ceil(a.shape[-1] / features_in_step)
    groups = ev.rank_groups(a, features_in_step, descending=False)
    if perturb_baseline == "uniform":
        if draws is None:
            dev = x.device if generator is None else generator.device
            draws = torch.rand((steps, nr_samples, b), generator=generator, dtype=torch.float64, device=dev)
        if draws.shape != (steps, nr_samples, b):
            raise ValueError(f"draws must have shape (steps, nr_samples, B) = {(steps, nr_samples, b)}, got "
                             f"{tuple(draws.shape)}")
        fills = [draws[:, s].to(x.device).T.unsqueeze(1) for s in range(nr_samples)]  # each (B, 1, steps)
    else:
        fills = [ev.fill_values(x, groups, steps, perturb_baseline, "single")]
    y = st.y.to(torch.float64).unsqueeze(-1)
    var = sum(((ev.step_scores(model, st, groups, fill.expand(b, a.shape[1], steps), steps, "single",
                               softmax=softmax, max_memory=max_memory).to(torch.float64) - y) ** 2) for fill in fills)
    var = var / len(fills)
    inv = torch.where(y.abs() >= eps, 1 / y.abs(), torch.ones_like(y)) ** 2
    return similarity_function(similarity_func)(ev.group_sums(a, groups, steps), var * inv).to(x.dtype)
