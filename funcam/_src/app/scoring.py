"""What ``funcam evaluate`` computes: its metrics, each one table entry that calls ``funcam.metrics`` with options
fixed by the run's ``Settings``, and its map sets (the methods' and the model-free baselines').

Every score is one value per (image, class), ``(B, K)``, from maps ``(B, K, H, W)`` at the input's size; a metric
whose ``funcam.metrics`` function returns a curve is scored by the area Quantus reports (``return_auc_per_sample``),
a NamedTuple by its per-pair fields. The perturbation metrics take ``steps`` steps per map, so that a run costs
``steps`` forwards per map and metric whatever the image size.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from funcam._src.core import baselines as bl
from funcam._src.core import complexity as cx
from funcam._src.core import faithfulness as ff
from funcam._src.core import metrics as mt
from funcam._src.core import regions as rg
from funcam._src.core import sampled as sp

__all__ = ["Settings", "Metric", "METRICS", "BASELINE_NAMES", "features_in_step", "baseline_maps"]

BASELINE_NAMES = tuple(bl.BASELINES)


class Settings(NamedTuple):
    """The options every metric of a run shares: ``steps`` perturbation steps per map (pixel flipping, faithfulness
    estimate, monotonicity, region perturbation's regions, deletion / insertion, faithfulness correlation's runs),
    ``patch_size`` pixels (region perturbation, selectivity), ``seed`` of each call's random draws, ``max_memory``
    bytes of perturbed inputs at once (None: the library default)."""
    steps: int = 16
    patch_size: int = 16
    seed: int = 0
    max_memory: int | None = None


Score = Callable[[Callable, Tensor, Tensor, Tensor, Settings], dict[str, Tensor]]


class Metric(NamedTuple):
    """columns: each column the metric writes -> 'higher' or 'lower' (which is better); score: ``(model, x (B, C,
    H, W), maps (B, K, H, W), classes (B, K), settings) -> {column: (B, K)}``; model: whether it runs the model."""
    columns: dict[str, str]
    score: Score
    model: bool = True


def features_in_step(x: Tensor, steps: int) -> int:
    """``ceil(C * H * W / steps)``: the features one of ``steps`` steps perturbs."""
    return -(-x[0].numel() // steps)


def _generator(s: Settings) -> torch.Generator:
    return torch.Generator().manual_seed(s.seed)


def _pixel_flipping(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"pixel_flipping": ff.pixel_flipping(model, x, maps, classes, features_in_step=features_in_step(x, s.steps),
                                                return_auc_per_sample=True, max_memory=s.max_memory)}


def _faithfulness_estimate(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"faithfulness_estimate": ff.faithfulness_estimate(
        model, x, maps, classes, features_in_step=features_in_step(x, s.steps), max_memory=s.max_memory)}


def _monotonicity(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"monotonicity": ff.monotonicity(model, x, maps, classes, features_in_step=features_in_step(x, s.steps),
                                            max_memory=s.max_memory).to(x.dtype)}


def _region_perturbation(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"region_perturbation": rg.region_perturbation(
        model, x, maps, classes, patch_size=s.patch_size, regions_evaluation=s.steps, return_auc_per_sample=True,
        max_memory=s.max_memory)}


def _selectivity(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"selectivity": rg.selectivity(model, x, maps, classes, patch_size=s.patch_size,
                                          return_auc_per_sample=True, max_memory=s.max_memory)}


def _irof(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"irof": rg.irof(model, x, maps, classes, max_memory=s.max_memory)}


def _faithfulness_correlation(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"faithfulness_correlation": sp.faithfulness_correlation(
        model, x, maps, classes, nr_runs=s.steps, generator=_generator(s), max_memory=s.max_memory)}


def _deletion_insertion(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    r = mt.deletion_insertion(model, x, maps, classes, steps=s.steps)
    return {"deletion_auc": r.deletion_auc, "insertion_auc": r.insertion_auc}


def _road(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    # the mean over the 9 default percentiles, as pytorch-grad-cam's ROADCombined averages its percentiles
    return {"road_morf": mt.road(model, x, maps, classes, generator=_generator(s)).mean(dim=-1)}


def _average_drop(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"average_drop": 100 * mt.confidence_change(model, x, maps, classes).drop}


def _sparseness(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"sparseness": cx.sparseness(None, x, maps)}


def _complexity(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"complexity": cx.complexity(None, x, maps)}


def _effective_complexity(model, x, maps, classes, s: Settings) -> dict[str, Tensor]:
    return {"effective_complexity": cx.effective_complexity(None, x, maps)}


# name -> Metric, in the order the table shows them
METRICS: dict[str, Metric] = {
    "deletion_insertion": Metric({"deletion_auc": "lower", "insertion_auc": "higher"}, _deletion_insertion),
    "pixel_flipping": Metric({"pixel_flipping": "lower"}, _pixel_flipping),
    "region_perturbation": Metric({"region_perturbation": "higher"}, _region_perturbation),
    "selectivity": Metric({"selectivity": "lower"}, _selectivity),
    "irof": Metric({"irof": "higher"}, _irof),
    "faithfulness_estimate": Metric({"faithfulness_estimate": "higher"}, _faithfulness_estimate),
    "faithfulness_correlation": Metric({"faithfulness_correlation": "higher"}, _faithfulness_correlation),
    "monotonicity": Metric({"monotonicity": "higher"}, _monotonicity),
    "road": Metric({"road_morf": "lower"}, _road),
    "average_drop": Metric({"average_drop": "lower"}, _average_drop),
    "sparseness": Metric({"sparseness": "higher"}, _sparseness, model=False),
    "complexity": Metric({"complexity": "lower"}, _complexity, model=False),
    "effective_complexity": Metric({"effective_complexity": "lower"}, _effective_complexity, model=False),
}


def baseline_maps(name: str, x: Tensor, classes: Tensor, generator: torch.Generator) -> Tensor:
    """The model-free maps ``(B, K, h, w)`` of baseline ``name`` (``funcam.metrics.BASELINES``) for ``x (B, C, H,
    W)`` and ``classes (B, K)``; the random maps are drawn from ``generator``."""
    fn = bl.BASELINES[name]
    return fn(None, x, classes, generator=generator) if name == "random" else fn(None, x, classes)
