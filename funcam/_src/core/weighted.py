"""The channel-weighting CAMs (the Grad-CAM family) as method computations: a ``Rule`` on the gradient of each
class's score at a split's features, for B images x K classes from one forward and one vmapped vjp
(``funcam._src.core.engine.class_maps``). Maps ``(B, K, h, w)`` at feature resolution.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from funcam._src.base import CAM, Split
from funcam._src.core.engine import class_maps
from funcam._src.core.projection import smoothed
from funcam._src.core.request import Request
from funcam._src.core.rules import Rule
from funcam._src.core.smoothing import AUG_SMOOTH, EIGEN_SMOOTH, RELU, aug_smooth, relu_maps

# The options every channel-weighting CAM takes (funcam._src.core.smoothing).
CAM_OPTIONS = (RELU, AUG_SMOOTH, EIGEN_SMOOTH)


class GradientCAM(NamedTuple):
    """The computation of a channel-weighting CAM method: ``rule`` for every image and requested class."""

    rule: Rule

    def __call__(self, split: Split, x: Tensor, req: Request) -> CAM:
        if req.options["aug_smooth"]:
            return aug_smooth(self, split, x, req)
        rule = smoothed(self.rule) if req.options["eigen_smooth"] else self.rule
        return relu_maps(class_maps(split, x, req, rule), req.options["relu"])


def rule_of(compute: object) -> Rule | None:
    """The ``Rule`` behind a method's computation when it is a ``GradientCAM``, else None."""
    return compute.rule if isinstance(compute, GradientCAM) else None
