"""The one table of funcam's methods: each entry carries its own computation.

Adding a method is one entry here, its equations in the module that computes it, and its tests; ``funcam.cam``,
its shortcuts (``funcam.gradcam``, ...), ``funcam.explain.explain``, the command line (``--method`` and the
method's own options), the gallery and the README's method list all read this table.

An entry says:

* ``compute(target, x, request) -> CAM``: the computation. ``target`` is a ``Split`` when ``needs == "split"`` (the
  caller splits a model first, at ``layer=`` when given), else the model (or a Split, for its captured graph).
* ``needs``: ``"split"`` (features at a cut: the CAM families), ``"attention"`` (a transformer's attention
  probabilities), ``"model"`` (the whole model: input gradients, relevance rules).
* ``output``: ``"map"``, maps ``(B, K, h, w)`` at feature (token-grid) or input resolution; ``"input"``,
  per-channel input attributions ``(B, K, C, H, W)``, which ``explain`` folds to one map per pixel by ``fold``.
* ``options``: the method's own keyword options (``request.Option``), checked once at the entry.
* ``signed``: the maps carry evidence for and against (drawn with a diverging colour scale); ``agnostic``: one map
  per image whatever the class (repeated over the K requested classes).

The command line spells each name with dashes (``gradcam-max``); both spellings are accepted everywhere.
"""
from __future__ import annotations

import difflib
from typing import Callable, NamedTuple

from funcam._src.core import rules
from funcam._src.core.ablation import ABLATION_OPTIONS, ablation_cam
from funcam._src.core.attributions import (
    IG_OPTIONS,
    SALIENCY_OPTIONS,
    input_x_gradient_cam,
    integrated_gradients_cam,
    saliency_cam,
)
from funcam._src.core.contrast import FINER_OPTIONS, finer_cam
from funcam._src.core.fullgrad import FULLGRAD_OPTIONS, full_grad
from funcam._src.core.guided import guided_backprop_cam, guided_gradcam_cam
from funcam._src.core.lrp import ATTN_OPTIONS, LRP, LRP_OPTIONS
from funcam._src.core.noise import NOISE_OPTIONS, SHAP_OPTIONS, gradient_shap_cam, smoothgrad_cam, vargrad_cam
from funcam._src.core.occlusion import OCCLUSION_OPTIONS, occlusion_cam
from funcam._src.core.perturbation import ISCAM_OPTIONS, SCORE_OPTIONS, SSCAM_OPTIONS, is_cam, score_cam, ss_cam
from funcam._src.core.projection import eigen_cam, eigen_grad_cam
from funcam._src.core.request import Option
from funcam._src.core.rollout import ROLLOUT_OPTIONS, Relevance, chefer_step, grad_rollout_step, rollout_cam
from funcam._src.core.shapley import SHAPLEY_OPTIONS, shapley_cam
from funcam._src.core.smoothing import AUG_SMOOTH, RELU, Finished
from funcam._src.core.weighted import CAM_OPTIONS, GradientCAM

NEEDS = ("split", "attention", "model")
OUTPUTS = ("map", "input")
FOLDS = ("absmax", "sum")


class Method(NamedTuple):
    """name: ``funcam.cam(method=name)``; title: how captions, grid rows and overlays name it; reference: the paper
    (and equation) or the peer it reproduces; compute, needs, output, options, signed, agnostic: see the module
    docstring; fold: for ``output == "input"``, how ``explain`` makes one map per pixel from the colour channels
    (``"absmax"``: the largest absolute value, ``"sum"``: the signed sum); use: when to reach for it, one line."""

    name: str
    title: str
    reference: str
    compute: Callable
    needs: str = "split"
    output: str = "map"
    options: tuple[Option, ...] = ()
    signed: bool = False
    agnostic: bool = False
    fold: str = "absmax"
    use: str = ""


def _cam(name: str, title: str, reference: str, rule: rules.Rule, use: str) -> Method:
    return Method(name, title, reference, GradientCAM(rule), options=CAM_OPTIONS, use=use)


TABLE: dict[str, Method] = {m.name: m for m in (
    _cam("gradcam", "Grad-CAM", "Selvaraju et al. 2017, eq. 1-2",
         rules.GRADCAM,
         "the default for CNNs: fast, class-specific, coarse"),
    _cam("gradcam_max", "Grad-CAM (max)", "Selvaraju et al. 2017, eq. 1 with max-pooled gradients",
         rules.Rule(rules.gradcam_max, rules.gradcam_max_weights, rules.channel_sum),
         "Grad-CAM with the largest gradient as channel weight"),
    _cam("gradcampp", "Grad-CAM++", "Chattopadhyay et al. 2018, eq. 19",
         rules.Rule(rules.gradcampp, rules.gradcampp_weights, rules.pooled_gradcampp),
         "several instances of a class in one image"),
    _cam("xgradcam", "XGrad-CAM", "Fu et al. 2020, eq. 11",
         rules.Rule(rules.xgradcam, rules.xgradcam_weights, rules.pooled_xgradcam),
         "Grad-CAM with activation-normalised weights"),
    _cam("hirescam", "HiResCAM", "Draelos & Carin 2020, eq. 4",
         rules.Rule(rules.hirescam, None, rules.channel_sum, terms=rules.hirescam_terms),
         "a map that provably reflects the locations the score used"),
    _cam("elementwise", "Element-wise Grad-CAM", "pytorch-grad-cam's GradCAMElementWise",
         rules.Rule(rules.elementwise, None, rules.pooled_elementwise, terms=rules.elementwise_terms),
         "HiResCAM with the positive products only"),
    _cam("layercam", "LayerCAM", "Jiang et al. 2021, eq. 5-6",
         rules.Rule(rules.layercam, None, rules.pooled_layercam, terms=rules.layercam_terms),
         "finer maps at earlier layers (fuse several with layer=[...])"),
    _cam("argmax_channel", "argmax channel", "the channel with the largest Grad-CAM weight",
         rules.Rule(rules.argmax_channel, None, rules.pooled_argmax_channel),
         "what the single most important channel sees"),
    Method("rollout", "attention rollout", "Abnar & Zuidema 2020, sec. 3", rollout_cam, needs="attention",
           options=ROLLOUT_OPTIONS, agnostic=True, use="what a ViT attends to, whatever the class"),
    Method("grad_rollout", "grad rollout", "gradient-weighted rollout (jacobgil/vit-explain)",
           Relevance(grad_rollout_step), needs="attention",
           use="class-specific attention flow in ViTs"),
    Method("chefer", "Chefer relevance", "Chefer, Gur & Wolf 2021, eq. 5-6", Relevance(chefer_step),
           needs="attention", use="the default for ViTs: class-specific, sharp"),
    Method("guided_gradcam", "Guided Grad-CAM", "Selvaraju et al. 2017, sec. 3.1", guided_gradcam_cam,
           output="input", use="fine detail inside the Grad-CAM region (ReLU models)"),
    Method("guided_backprop", "Guided Backprop", "Springenberg et al. 2015", guided_backprop_cam, needs="model",
           output="input", use="edges the network responds to (ReLU models; not class-discriminative)"),
    Method("attnlrp", "AttnLRP", "Achtibat et al. 2024 (lxt 2.1, efficient mode)", LRP("attnlrp"), needs="model",
           options=ATTN_OPTIONS, signed=True, fold="sum",
           use="relevance for any transformer (window attention, several token sequences); pixel-sharp"),
    Method("cplrp", "CP-LRP", "Ali et al. 2022 (lxt 2.1)", LRP("cplrp"), needs="model", options=ATTN_OPTIONS,
           signed=True, fold="sum", use="AttnLRP with the attention probabilities held constant"),
    Method("lrp", "LRP", "Bach et al. 2015; zennit 0.5's composites", LRP(), needs="model", options=LRP_OPTIONS,
           signed=True, fold="sum", use="relevance for CNNs (composite=epsilon_plus, ...), conserving the score"),
    # perturbation and projection CAMs (issue 25): every class from one set of masked forwards / ablations / SVDs
    Method("scorecam", "Score-CAM", "Wang et al. 2020, eq. 4-7 (pytorch-grad-cam's ScoreCAM)", Finished(score_cam),
           options=SCORE_OPTIONS, use="gradient-free weights; C masked forwards serve every class"),
    Method("sscam", "SS-CAM", "Wang et al. 2020b, eq. 6 (torchcam's SSCAM)", Finished(ss_cam),
           options=SSCAM_OPTIONS, use="Score-CAM averaged over noisy masks (num_samples x C forwards)"),
    Method("iscam", "IS-CAM", "Naidu et al. 2020, eq. 4 (torchcam's ISCAM)", Finished(is_cam),
           options=ISCAM_OPTIONS, use="Score-CAM integrated over mask intensities (num_samples x C forwards)"),
    Method("ablationcam", "Ablation-CAM", "Desai & Ramaswamy 2020, eq. 3-4", Finished(ablation_cam),
           options=ABLATION_OPTIONS, use="gradient-free weights from zeroing each channel; only the head re-runs"),
    Method("eigencam", "Eigen-CAM", "Muhammad & Yeasin 2020, eq. 3-4", Finished(eigen_cam),
           options=(RELU, AUG_SMOOTH), agnostic=True,
           use="the features' dominant pattern, whatever the class; no gradients"),
    Method("eigengradcam", "EigenGrad-CAM", "pytorch-grad-cam's EigenGradCAM", Finished(eigen_grad_cam),
           options=(RELU, AUG_SMOOTH), use="the dominant pattern of gradient x activations, per class"),
    Method("finercam", "Finer-CAM", "Zhang et al. 2025, eq. 3-4 (pytorch-grad-cam's FinerCAM)", Finished(finer_cam),
           options=FINER_OPTIONS,
           use="what tells a class apart from its most similar classes (or from versus=...)"),
    Method("fullgrad", "FullGrad", "Srinivas & Fleuret 2019, eq. 6 (pytorch-grad-cam's FullGrad)",
           Finished(full_grad), needs="model", options=FULLGRAD_OPTIONS,
           use="input-resolution maps from the input and every bias gradient (CNNs with biased conv / BN)"),
    Method("shapleycam", "ShapleyCAM", "Cai et al. 2025, eq. 9 (pytorch-grad-cam's ShapleyCAM)",
           Finished(shapley_cam), options=SHAPLEY_OPTIONS,
           use="Grad-CAM with the head's second-order term (equal to it for piecewise-linear heads)"),
    # input-gradient attributions (captum's): per-channel maps; "absmax" folds the unsigned magnitudes as Simonyan et
    # al. 2014 (sec. 3.1: the largest |gradient| over the channels), "sum" keeps the additive ones additive (IG's
    # completeness, SHAP's local accuracy: the channels of a pixel sum to its share of the score difference)
    Method("saliency", "Saliency", "Simonyan et al. 2014, sec. 3.1 (captum's Saliency)", saliency_cam,
           needs="model", output="input", options=SALIENCY_OPTIONS,
           use="the plain input gradient's magnitude: fast, noisy"),
    Method("input_x_gradient", "Input x Gradient", "Shrikumar et al. 2016 (captum's InputXGradient)",
           input_x_gradient_cam, needs="model", output="input", signed=True, fold="sum",
           use="the first-order contribution of each pixel, for and against"),
    Method("integrated_gradients", "Integrated Gradients", "Sundararajan et al. 2017, eq. 1-3 (captum's "
           "IntegratedGradients)", integrated_gradients_cam, needs="model", output="input", options=IG_OPTIONS,
           signed=True, fold="sum", use="attributions that add up to the score's change from a baseline"),
    Method("smoothgrad", "SmoothGrad", "Smilkov et al. 2017, eq. 2 (captum's NoiseTunnel(Saliency))", smoothgrad_cam,
           needs="model", output="input", options=NOISE_OPTIONS,
           use="a saliency map with the gradient's noise averaged away"),
    Method("vargrad", "VarGrad", "Adebayo et al. 2018 (captum's NoiseTunnel(Saliency), vargrad)", vargrad_cam,
           needs="model", output="input", options=NOISE_OPTIONS,
           use="where the gradient varies most under input noise"),
    Method("gradient_shap", "GradientShap", "Lundberg & Lee 2017, expected gradients (captum's GradientShap)",
           gradient_shap_cam, needs="model", output="input", options=SHAP_OPTIONS, signed=True, fold="sum",
           use="SHAP values against a distribution of baselines"),
    Method("occlusion", "Occlusion", "Zeiler & Fergus 2014, sec. 4.2 (captum's Occlusion)", occlusion_cam,
           needs="model", output="input", options=OCCLUSION_OPTIONS, signed=True, fold="sum",
           use="what covering each region costs the score: no gradients, any model"),
)}

# funcam.METHODS: the channel-weighting CAM methods of the Grad-CAM family (a Rule on the gradient at a cut)
CAM_METHODS = tuple(n for n, m in TABLE.items() if m.options is CAM_OPTIONS)


def cli_name(name: str) -> str:
    """The command line's spelling: ``gradcam_max`` -> ``gradcam-max``."""
    return name.replace("_", "-")


def get(method: object, *, spell: Callable[[str], str] = str) -> Method:
    """The table entry for ``method`` (either spelling), or a ValueError naming the valid ones as ``spell`` writes
    them (``cli_name`` for the command line)."""
    m = TABLE.get(str(method).replace("-", "_")) if isinstance(method, str) else None
    if m is None:
        names = [spell(n) for n in TABLE]
        # "gradcam++" is how papers write Grad-CAM++: suggest gradcampp, not the nearer-spelled gradcam
        near = difflib.get_close_matches(spell(str(method).replace("-", "_").replace("++", "pp")), names, n=1)
        raise ValueError(f"method must be one of {', '.join(names)}; got {method!r}"
                         + (f" (did you mean {near[0]!r}?)" if near else ""))
    return m


def describe(m: Method) -> str:
    """A shortcut's docstring from its entry: what it computes, its shapes, its options."""
    shape = "(B, K, C, H, W) per-channel input attributions" if m.output == "input" else "maps (B, K, h, w)"
    opts = "".join(f"\n    {o.name} (default {o.default!r}): {o.help}" for o in m.options)
    return (f"{m.title} ({m.reference}): x (B, C, H, W) -> {shape}.\n\n    {m.use}.\n    Arguments as "
            f"``funcam.cam(model_or_split, x, classes, method={m.name!r}, ...)``"
            + (f"; options:{opts}" if opts else "."))
