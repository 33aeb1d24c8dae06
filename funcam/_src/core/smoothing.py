"""What every CAM method does after its own computation: the ReLU, and pytorch-grad-cam's two smoothings.

* ``relu``: at feature resolution, before any upsampling (upsampling first would let one large negative value bleed
  into its neighbours).
* ``aug_smooth``: test-time augmentation as pytorch-grad-cam's ``forward_augmentation_smoothing`` with its default
  ttach transforms, horizontal flip x multiply by (0.9, 1, 1.1): the method runs on the 6 augmented copies, each
  copy's maps are min-max scaled to [0, 1] (the peer scales every augmentation's map before averaging, so that each
  counts the same), flipped back, and averaged. funcam scales at the maps' own (feature) resolution, where the peer
  scales after resizing to the input: the result is a map at feature resolution in [0, 1], as ``funcam.normalize``
  would give, and each copy's map equals the peer's for that copy (tests/core/test_smoothing.py). The copy as given
  runs first and decides the classes (``top_k``), which the other 5 copies then explain in one batched call; with a
  score callable, each copy is one call, so the callable sees B images as always.
* ``eigen_smooth``: the first principal component of the per-channel terms instead of their sum
  (``funcam._src.core.projection``); each method applies it where its terms are formed.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from funcam._src.base import CAM
from funcam._src.core.postprocess import normalize
from funcam._src.core.request import Option, Request, flag

RELU = Option("relu", True, flag("relu"), "ReLU at feature resolution, before any upsampling (False: signed maps)")
AUG_SMOOTH = Option("aug_smooth", False, flag("aug_smooth"),
                    "average the maps of 6 augmented copies (flip x brightness 0.9, 1, 1.1), each scaled to [0, 1]",
                    lambda text: yes_no("aug_smooth", text))
EIGEN_SMOOTH = Option("eigen_smooth", False, flag("eigen_smooth"),
                      "the first principal component of the channel terms instead of their sum",
                      lambda text: yes_no("eigen_smooth", text))

# pytorch-grad-cam's default ttach transforms: (flip, brightness factor); the identity first
AUGMENTATIONS = ((False, 1.0), (False, 0.9), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1))


def yes_no(name: str, text: str) -> bool:
    """The command line's spelling of a flag option: yes/no, true/false, on/off, 1/0."""
    v = str(text).strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{name} must be yes or no, got {text!r}")


def _each(maps: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    return tuple(fn(m) for m in maps) if isinstance(maps, tuple) else fn(maps)


def relu_maps(out: CAM, relu: bool) -> CAM:
    """``out`` with its maps (a tuple of them for a multi-layer split) passed through ReLU when ``relu``."""
    return out._replace(maps=_each(out.maps, torch.relu)) if relu else out


def augment(x: Tensor, flip: bool, factor: float) -> Tensor:
    """One of ttach's augmentations of ``x (B, C, H, W)``: ``HorizontalFlip`` then ``Multiply(factor)``."""
    return (x.flip(-1) if flip else x) * factor


def _restored(maps: Any, flip: bool) -> Any:
    """A copy's maps, min-max scaled per map and flipped back (``deaugment_mask``; a flip commutes with resizing)."""
    return _each(maps, lambda m: normalize(m).flip(-1) if flip else normalize(m))


def aug_smooth(compute: Callable[[Any, Tensor, Request], CAM], target: Any, x: Tensor, req: Request) -> CAM:
    """``compute`` with test-time augmentation (module docstring): ``CAM(maps (B, K, h, w) in [0, 1], the classes of
    the copy as given, its logits)``. ``compute`` is called with ``aug_smooth`` off."""
    off = req._replace(options={**req.options, "aug_smooth": False})
    first = compute(target, x, off)
    total = _restored(first.maps, False)
    rest = AUGMENTATIONS[1:]
    if req.score_fn is None:
        b = x.shape[0]
        xs = torch.cat([augment(x, f, s) for f, s in rest])
        many = compute(target, xs, off.with_classes(first.classes.repeat(len(rest), 1))).maps
        copies = [_each(many, lambda m, i=i: m[i * b:(i + 1) * b]) for i in range(len(rest))]
    else:
        copies = [compute(target, augment(x, f, s), off).maps for f, s in rest]
    for (flip, _), maps in zip(rest, copies):
        r = _restored(maps, flip)
        total = tuple(t + m for t, m in zip(total, r)) if isinstance(total, tuple) else total + r
    return first._replace(maps=_each(total, lambda t: t / len(AUGMENTATIONS)))


class Finished(NamedTuple):
    """A method's computation (raw maps) with the shared options applied: ``aug_smooth`` around it, ``relu`` after
    it; ``eigen_smooth`` is the computation's own (it changes how the terms are summed)."""

    compute: Callable[[Any, Tensor, Request], CAM]

    def __call__(self, target: Any, x: Tensor, req: Request) -> CAM:
        if req.options.get("aug_smooth", False):
            return aug_smooth(self, target, x, req)
        return relu_maps(self.compute(target, x, req), req.options.get("relu", False))
