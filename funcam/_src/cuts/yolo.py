"""Ultralytics YOLO detectors (``DetectionModel``: YOLOv8, YOLO11, ... with a ``Detect`` head) in eval mode as splits.

``extract(x (B, 3, H, W))`` runs the model's layers up to its ``Detect`` head; the maps are the head's inputs, one per
level (P3, P4, P5: strides 8, 16, 32), ``(B, C_l, h_l, w_l)``. ``head(features)`` runs the ``Detect`` head and
Ultralytics' own ``non_max_suppression`` as selection (the kept anchors found on detached predictions, as its
predictor calls it: ``conf`` 0.25, ``iou`` 0.7, ``max_det`` 300), then gathers those anchors' decoded boxes and class
scores with their gradients: a list of B dicts ``boxes (M, 4)`` (x1, y1, x2, y2 in x's pixels), ``labels (M,)``,
``scores (M,)``, for ``funcam.targets.boxes``. One map per level, as for torchvision's detectors: an anchor belongs
to one level, so a box's gradient lives there (``funcam.fuse`` for one map per box).

YOLO cannot take the graph route (``torch.export`` stops at ``aten.allclose`` in its anchors' cache check), so the
layers are run here as the model runs them (``DetectionModel._predict_once``: each layer reads its ``f`` inputs
from the saved outputs).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

from funcam._src.base import Split


def _detect(model: nn.Module) -> nn.Module | None:
    layers = getattr(model, "model", None)
    last = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    return last if last is not None and any(c.__name__ == "Detect" and c.__module__.startswith("ultralytics.")
                                            for c in type(last).__mro__) else None


def applies(model: nn.Module) -> bool:
    """Whether ``split`` takes this model: an Ultralytics detection model (or its ``YOLO`` wrapper's ``.model``)
    whose last layer is a plain ``Detect`` head (not end-to-end, not a segmentation, pose or oriented-box head)."""
    d = _detect(model)
    return d is not None and type(d).__name__ == "Detect" and not getattr(d, "end2end", False) \
        and isinstance(getattr(d, "f", None), (list, tuple))


def split(model: nn.Module, *, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> Split:
    """``Split(extract, head)`` of an Ultralytics detection model (module docstring): x (B, 3, H, W) -> Features(maps
    = the Detect head's inputs) -> list of B detection dicts. conf, iou, max_det: the NMS settings (Ultralytics'
    predictor's defaults). ValueError for a model ``applies`` refuses."""
    if not applies(model):
        raise ValueError(f"yolo split: {type(model).__name__} is not an Ultralytics detection model with a Detect head "
                         f"(for an ultralytics.YOLO object, pass its .model)")
    extract, head, layers = _parts(model, conf, iou, max_det)
    return Split(extract, head, 3, layers, module=model)


def _parts(model: nn.Module, conf: float, iou: float, max_det: int) -> tuple[Callable, Callable, tuple[str, ...]]:
    layers = model.model
    det = layers[-1]
    nms = importlib.import_module("ultralytics.utils.nms").non_max_suppression  # loaded with the model's own package

    def extract(x: Tensor) -> tuple[Tensor, ...]:
        """x (B, 3, H, W) -> the Detect head's input maps, one per level."""
        saved: list[Any] = []
        t: Any = x
        for m in layers[:-1]:
            if m.f != -1:
                t = saved[m.f] if isinstance(m.f, int) else [t if j == -1 else saved[j] for j in m.f]
            t = m(t)
            saved.append(t)
        return tuple(t if j == -1 else saved[j] for j in det.f)

    def head(maps: tuple[Tensor, ...]) -> list:
        """Per-level maps -> the detections after NMS (module docstring)."""
        y, _ = det(list(maps))  # (B, 4 + classes, anchors): xywh boxes in pixels, class probabilities
        kept, idxs = nms(y.detach(), conf, iou, max_det=max_det, return_idxs=True)
        out = []
        for b, (k, i) in enumerate(zip(kept, idxs)):
            i = i.long().reshape(-1)
            labels = k[:, 5].long()
            xywh = y[b, :4, i].T  # (M, 4)
            boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], dim=1)
            scores = y[b, 4 + labels, i]
            out.append({"boxes": boxes, "labels": labels, "scores": scores})
        return out

    return extract, head, tuple(f"model.{j if j >= 0 else len(layers) - 2}" for j in det.f)
