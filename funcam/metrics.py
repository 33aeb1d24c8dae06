"""Explanation quality, batched over B images x K classes: localisation, faithfulness, robustness, complexity,
axiomatic and randomisation metrics (Quantus 0.6's definitions and option names), model-free baselines beside them.

Every Quantus-style metric is ``name(model, x (B, C, H, W), maps (B, K, h, w) or (B, K, C, H, W), classes (K,) or
(B, K), **options) -> (B, K)`` (curves ``(B, K, T)``); see ``funcam._src.core`` for each definition.
Public names only; the implementation is in ``funcam._src.core``.
"""
from funcam._src.core.axiomatic import completeness, non_sensitivity
from funcam._src.core.baselines import BASELINES, centre_maps, random_maps, sobel_maps, with_baselines
from funcam._src.core.complexity import complexity, discrete_entropy, effective_complexity, sparseness
from funcam._src.core.faithfulness import faithfulness_estimate, monotonicity, pixel_flipping, sensitivity_n
from funcam._src.core.localisation import (
    attribution_localisation,
    auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from funcam._src.core.metrics import (
    ConfidenceChange,
    DeletionInsertion,
    boxes_to_masks,
    confidence_change,
    deletion_insertion,
    energy_in_box,
    impute,
    pointing_game,
    road,
)
from funcam._src.core.randomisation import MPRT, efficient_mprt, mprt, random_logit, smooth_mprt
from funcam._src.core.randomised import call_with, randomisable_layers, randomised_outputs, randomised_states
from funcam._src.core.recompute import gradcam_explainer
from funcam._src.core.regions import infidelity, irof, region_perturbation, selectivity, superpixels
from funcam._src.core.robustness import avg_sensitivity, local_lipschitz_estimate, max_sensitivity
from funcam._src.core.sampled import faithfulness_correlation, monotonicity_correlation
from funcam._src.core.similarity import pearson, spearman, ssim

__all__ = [
    "BASELINES",
    "ConfidenceChange",
    "DeletionInsertion",
    "MPRT",
    "attribution_localisation",
    "auc",
    "avg_sensitivity",
    "boxes_to_masks",
    "call_with",
    "centre_maps",
    "completeness",
    "complexity",
    "confidence_change",
    "deletion_insertion",
    "discrete_entropy",
    "effective_complexity",
    "efficient_mprt",
    "energy_in_box",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "gradcam_explainer",
    "impute",
    "infidelity",
    "irof",
    "local_lipschitz_estimate",
    "max_sensitivity",
    "monotonicity",
    "monotonicity_correlation",
    "mprt",
    "non_sensitivity",
    "pearson",
    "pixel_flipping",
    "pointing_game",
    "random_logit",
    "random_maps",
    "randomisable_layers",
    "randomised_outputs",
    "randomised_states",
    "region_perturbation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road",
    "selectivity",
    "sensitivity_n",
    "smooth_mprt",
    "sobel_maps",
    "sparseness",
    "spearman",
    "ssim",
    "superpixels",
    "top_k_intersection",
    "with_baselines",
]
