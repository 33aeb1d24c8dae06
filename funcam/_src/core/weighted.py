"""The channel-weighting CAMs (the Grad-CAM family) as method computations: a ``Rule`` on the gradient of each
class's score at a split's features, for B images x K classes from one forward and one vmapped vjp
(``funcam._src.core.engine.class_maps``). Maps ``(B, K, h, w)`` at feature resolution.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from funcam._src.base import CAM, Split
from funcam._src.core.engine import class_maps
from funcam._src.core.request import Option, Request, flag
from funcam._src.core.rules import Rule

# The options every channel-weighting CAM takes.
CAM_OPTIONS = (
    Option("relu", True, flag("relu"), "ReLU at feature resolution, before any upsampling (False: signed maps)"),
)


def relu_maps(out: CAM, relu: bool) -> CAM:
    """``out`` with its maps (a tuple of them for a multi-layer split) passed through ReLU when ``relu``: at feature
    resolution, because upsampling first would let one large negative value bleed into its neighbours."""
    if not relu:
        return out
    maps = out.maps
    return out._replace(maps=tuple(torch.relu(a) for a in maps) if isinstance(maps, tuple) else torch.relu(maps))


class GradientCAM(NamedTuple):
    """The computation of a channel-weighting CAM method: ``rule`` for every image and requested class."""

    rule: Rule

    def __call__(self, split: Split, x: Tensor, req: Request) -> CAM:
        return relu_maps(class_maps(split, x, req, self.rule), req.options["relu"])


def rule_of(compute: object) -> Rule | None:
    """The ``Rule`` behind a method's computation when it is a ``GradientCAM``, else None."""
    return compute.rule if isinstance(compute, GradientCAM) else None
