"""Detectors for reference boxes: a torchvision detection builder or an Ultralytics YOLO config, each with a local
state dict; the category names; the input they take. Nothing is downloaded.

* ``torchvision:NAME``: a builder of ``torchvision.models.detection`` (``fasterrcnn_mobilenet_v3_large_320_fpn``,
  ``retinanet_resnet50_fpn``, ...), built with ``weights=None, weights_backbone=None`` and then given the
  checkpoint. Its number of classes is read from the checkpoint's classifier (R-CNN, RetinaNet, FCOS), else
  ``num_classes`` (default 91, COCO's, whose category names torchvision ships).
* ``yolo:CONFIG``: an Ultralytics detection model config (``yolo11n.yaml``, ``yolov8s.yaml`` from the ultralytics
  package, or a path), built with ``DetectionModel`` and then given the checkpoint, a state dict: an Ultralytics
  ``.pt`` file is a pickle of the whole model, which ``weights_only`` refuses; save its ``.model.state_dict()``.

Both take the image itself, scaled to [0, 1] (the torchvision model resizes and normalises inside, and maps its
boxes back to the image's pixels), so boxes are in the image's own pixels; YOLO's input is padded at the bottom and
right to a multiple of its largest stride (grey 114, as Ultralytics pads), which moves no pixel.
"""
from __future__ import annotations

import difflib
import glob
import os
import re
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcam._src.app.hub import ModelError, load_strict, seeded
from funcam._src.app.hub import why as _why

__all__ = ["Detector", "check_detector", "load_detector", "detector_input"]

# builder-name pattern -> (the classifier's weight in its state dict, anchors per position)
_CLASSIFIERS = (("rcnn", "roi_heads.box_predictor.cls_score.weight", 1),
                ("retinanet", "head.classification_head.cls_logits.weight", 9),
                ("fcos", "head.classification_head.cls_logits.weight", 1))


class Detector(NamedTuple):
    """A loaded detector: ``model`` (eval mode), ``categories`` (label -> name, or None), ``stride`` (its input's
    height and width must be multiples of it)."""
    model: nn.Module
    categories: list[str] | None
    stride: int


def _prefix(name: str) -> tuple[str, str]:
    family, _, rest = name.partition(":")
    if family not in ("torchvision", "yolo") or not rest:
        raise ModelError(f"a detector is torchvision:NAME or yolo:CONFIG, got {name!r}")
    return family, rest


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.detection)


def _yolo_config(cfg: str) -> str:
    """The path of the Ultralytics model config ``cfg`` (a file, or a name in the ultralytics package, its scale
    letter dropped as Ultralytics does: ``yolo11n.yaml`` -> ``yolo11.yaml``, scale n)."""
    if os.path.isfile(cfg):
        return cfg
    import ultralytics

    root = os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "models")
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", os.path.splitext(os.path.basename(cfg))[0]) + ".yaml"
    found = sorted(glob.glob(os.path.join(root, "*", unified)))
    if not found:
        names = sorted({os.path.basename(p) for p in glob.glob(os.path.join(root, "*", "*.yaml"))})
        near = difflib.get_close_matches(unified, names, n=3)
        raise ModelError(f"unknown Ultralytics model config {cfg!r}" + (
            f"; did you mean {', '.join(map(repr, near))} (with a scale letter n, s, m, l or x)?" if near else ""))
    return found[0]


def check_detector(name: str, *, checkpoint: bool, random_weights: bool) -> None:
    """Check ``name`` and its source of weights before anything is built (module docstring); ModelError says why."""
    family, rest = _prefix(name)
    if family == "torchvision":
        names = _torchvision_names()
        if rest not in names:
            near = difflib.get_close_matches(rest, names, n=3)
            raise ModelError(f"unknown torchvision detector {rest!r}" + (
                f"; did you mean {', '.join(map(repr, near))}?" if near else f"; one of {', '.join(names)}"))
    else:
        _yolo_config(rest)
    if not (checkpoint or random_weights):
        raise ModelError(f"{name} needs weights: --checkpoint FILE (a state dict), or --random-weights (an untrained "
                         f"network: its detections and maps mean nothing)")


def checkpoint_classes(name: str, state: dict[str, Tensor]) -> int | None:
    """The number of classes of a detector's state dict, from its classifier's rows (None when not found)."""
    family, rest = _prefix(name)
    if family == "yolo":
        keys = [k for k in state if re.fullmatch(r"model\.\d+\.cv3\.0\.2\.weight", k)]
        return int(state[max(keys, key=lambda k: int(k.split(".")[1]))].shape[0]) if keys else None
    for pattern, key, anchors in _CLASSIFIERS:
        if pattern in rest and key in state:
            return int(state[key].shape[0]) // anchors
    return None


def load_detector(name: str, *, checkpoint: dict | None = None, random_weights: bool = False,
                  num_classes: int | None = None) -> Detector:
    """Build the detector ``name`` (``torchvision:NAME`` or ``yolo:CONFIG``) in eval mode with its weights: a state
    dict (already read and checked), or seeded random weights when ``random_weights``."""
    check_detector(name, checkpoint=checkpoint is not None, random_weights=random_weights)
    family, rest = _prefix(name)
    if checkpoint is not None:
        num_classes = num_classes or checkpoint_classes(name, checkpoint)
    try:
        with seeded():
            model = _build_yolo(rest, num_classes) if family == "yolo" else _build_torchvision(rest, num_classes)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - builders raise many kinds
        raise ModelError(f"could not build {name}: {_why(e)}") from e
    if checkpoint is not None:
        load_strict(model, checkpoint, f"checkpoint does not fit {name}")
    model = model.eval()
    if family == "yolo":
        return Detector(model, _yolo_names(model), int(max(model.stride.tolist())))
    return Detector(model, _torchvision_names_of(rest, num_classes or 91), 1)  # the builders' default: 91


def _build_torchvision(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    kw = {} if num_classes is None else {"num_classes": num_classes}
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw)


def _torchvision_names_of(name: str, num_classes: int) -> list[str] | None:
    """COCO's category names (shipped with torchvision's weight enums) when the model has their number of classes."""
    import torchvision

    cats = torchvision.models.get_model_weights(name).DEFAULT.meta.get("categories")
    return list(cats) if cats and num_classes == len(cats) else None


def _build_yolo(cfg: str, num_classes: int | None) -> nn.Module:
    import warnings

    import yaml
    from ultralytics.nn.tasks import DetectionModel

    with open(_yolo_config(cfg), encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    # the scale letter of the name (yolo11n -> n), as Ultralytics' yaml_model_load reads it, without its file search
    scale = re.search(r"\d+([nslmx])(?:-|$)", os.path.splitext(os.path.basename(cfg))[0])
    spec.update(scale=scale.group(1) if scale else next(iter(spec.get("scales", {"n": 0}))), yaml_file=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ultralytics' own notices
        return DetectionModel(spec, nc=num_classes, verbose=False)


def _yolo_names(model: nn.Module) -> list[str] | None:
    """COCO's 80 names (from the ultralytics package's coco.yaml) when the model has 80 classes."""
    import ultralytics
    import yaml

    nc = int(model.model[-1].nc)
    path = os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "datasets", "coco.yaml")
    if nc != 80 or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = yaml.safe_load(f).get("names", {})
    return [names[i] for i in range(80)] if len(names) == 80 else None


def detector_input(images: Sequence[Tensor], stride: int = 1) -> Tensor:
    """``uint8 (3, H, W)`` images of one size -> ``(B, 3, H', W')`` in [0, 1], padded at the bottom and right to
    multiples of ``stride`` with grey 114 / 255 (no pixel moves: a box keeps its coordinates)."""
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) != 1:
        raise ValueError(f"detector_input needs images of one size, got {sorted(sizes)}")
    x = torch.stack(list(images)).float().div(255)
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % stride, -w % stride
    return F.pad(x, (0, pad_w, 0, pad_h), value=114 / 255) if pad_h or pad_w else x
