"""The one table of funcam's methods: adding a method is one entry here, with its equation in ``rules``
(channel-weighting CAMs), ``rollout`` (attention relevance) or ``guided`` (input gradients).

Every method is computed by ``funcam.cam(model_or_split, x, classes, method=name)``; ``kind`` says how:

* ``"cam"``: ``rule(g, A)`` on the gradient ``g = d score_k / dA`` and the features ``A`` of a split, per class,
  inside the vmap (``weights``: the channel weights when the map is ``sum_c w_c A_c``; ``pooled``: the same rule
  for a spatially constant gradient, the average-pool fast path). Maps ``(B, K, h, w)`` at feature resolution.
* ``"relevance"``: ``rule(row, dscore/dA_l, A_l)`` folds each attention layer's probabilities and their gradient
  into the readout row. Maps ``(B, K, h, w)`` on the token grid.
* ``"rollout"``: class-agnostic attention rollout, the same map repeated for the K classes.
* ``"guided"``: input gradients under the guided ReLU rule, ``(B, K, C, H, W)`` at input resolution.

The command line spells each name with dashes (``gradcam-max``); both spellings are accepted everywhere.
"""
from __future__ import annotations

import difflib
from typing import Callable, NamedTuple

from funcam._src.base import Reduce
from funcam._src.core import rules
from funcam._src.core.rollout import chefer_step, grad_rollout_step

KINDS = ("cam", "relevance", "rollout", "guided")


class Method(NamedTuple):
    """name: ``funcam.cam(method=name)``; title: how captions, grid rows and overlays name it; kind: one of
    ``KINDS``; reference: the paper (and equation); rule / weights / pooled: see the module docstring; mean: the
    channel weights are the spatial mean of the gradient (Grad-CAM), which the engine may take from the head's
    Jacobian in a shift added at every position (fewer forward passes than classes)."""

    name: str
    title: str
    kind: str
    reference: str
    rule: Callable | None = None
    weights: Reduce | None = None
    pooled: Callable | None = None
    mean: bool = False


TABLE: dict[str, Method] = {m.name: m for m in (
    Method("gradcam", "Grad-CAM", "cam", "Selvaraju et al. 2017, eq. 1-2",
           rules.gradcam, rules.gradcam_weights, rules.channel_sum, mean=True),
    Method("gradcam_max", "Grad-CAM (max)", "cam", "Selvaraju et al. 2017, eq. 1 with max-pooled gradients",
           rules.gradcam_max, rules.gradcam_max_weights, rules.channel_sum),
    Method("gradcampp", "Grad-CAM++", "cam", "Chattopadhyay et al. 2018, eq. 19",
           rules.gradcampp, rules.gradcampp_weights, rules.pooled_gradcampp),
    Method("xgradcam", "XGrad-CAM", "cam", "Fu et al. 2020, eq. 11",
           rules.xgradcam, rules.xgradcam_weights, rules.pooled_xgradcam),
    Method("hirescam", "HiResCAM", "cam", "Draelos & Carin 2020, eq. 4",
           rules.hirescam, None, rules.channel_sum),
    Method("elementwise", "Element-wise Grad-CAM", "cam", "pytorch-grad-cam's GradCAMElementWise",
           rules.elementwise, None, rules.pooled_elementwise),
    Method("layercam", "LayerCAM", "cam", "Jiang et al. 2021, eq. 5-6",
           rules.layercam, None, rules.pooled_layercam),
    Method("argmax_channel", "argmax channel", "cam", "the channel with the largest Grad-CAM weight",
           rules.argmax_channel, None, rules.pooled_argmax_channel),
    Method("rollout", "attention rollout", "rollout", "Abnar & Zuidema 2020, sec. 3"),
    Method("grad_rollout", "grad rollout", "relevance", "gradient-weighted rollout (jacobgil/vit-explain)",
           grad_rollout_step),
    Method("chefer", "Chefer relevance", "relevance", "Chefer, Gur & Wolf 2021, eq. 5-6", chefer_step),
    Method("guided_gradcam", "Guided Grad-CAM", "guided", "Selvaraju et al. 2017, sec. 3.1"),
    Method("guided_backprop", "Guided Backprop", "guided", "Springenberg et al. 2015"),
)}

# funcam.METHODS: the channel-weighting CAM methods, the ones that apply to every split
CAM_METHODS = tuple(n for n, m in TABLE.items() if m.kind == "cam")


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
