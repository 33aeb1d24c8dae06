"""Post-processing in torch, on the maps' device: upsampling, min-max normalisation, multi-layer fusion.

Kept apart from the methods: raw maps stay at feature resolution until the caller asks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["upsample", "normalize", "fuse"]


def _check_maps(maps: Tensor, name: str = "maps") -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 4:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a (B, K, h, w) tensor, got {got}")


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    s = tuple(size)
    if len(s) != 2 or not all(isinstance(v, int) and v > 0 for v in s):
        raise ValueError(f"size must be an int or (H, W) of positive ints, got {size!r}")
    return s


def upsample(maps: Tensor, size: int | Sequence[int], *, mode: str = "bilinear") -> Tensor:
    """maps (B, K, h, w) -> (B, K, H, W), bilinear with ``align_corners=False`` (cv2.INTER_LINEAR's grid)."""
    _check_maps(maps)
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    kw = {} if mode == "nearest" else {"align_corners": False}
    if maps.numel() == 0:  # B = 0 or K = 0: F.interpolate refuses empty batches
        return maps.new_zeros(tuple(maps.shape[:2]) + _size(size))
    return F.interpolate(maps, size=_size(size), mode=mode, **kw)


def normalize(maps: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Per-map min-max scaling to [0, 1]: ``(m - min) / (max(m - min) + eps)`` over each (h, w) map.

    An all-constant map becomes all zeros rather than NaN. Half-precision maps are scaled in float32 (a
    float16 range above 65504 would overflow to inf, and inf / inf is NaN) and returned in their dtype.
    """
    _check_maps(maps)
    m = maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps
    shifted = m - m.amin(dim=(2, 3), keepdim=True)
    return (shifted / (shifted.amax(dim=(2, 3), keepdim=True) + eps)).to(maps.dtype)


def fuse(maps: Sequence[Tensor], *, size: int | Sequence[int] | None = None, mode: str = "mean",
         normalize_each: bool = False) -> Tensor:
    """Fuse multi-layer maps ``[(B, K, h_i, w_i), ...]`` into one ``(B, K, H, W)``.

    Each map is (optionally min-max normalised, then) upsampled to ``size`` (default: the largest map's),
    then the layers are combined by ``mode`` 'mean' or 'max'. pytorch-grad-cam's multi-layer result is
    ``normalize(fuse(relu maps, size=input size, normalize_each=True))``.
    """
    if isinstance(maps, Tensor):
        maps = (maps,)
    if not maps:
        raise ValueError("maps must be a non-empty sequence of (B, K, h, w) tensors")
    for i, m in enumerate(maps):
        _check_maps(m, f"maps[{i}]")
    if len({m.shape[:2] for m in maps}) != 1:
        raise ValueError(f"maps must share (B, K), got shapes {[tuple(m.shape) for m in maps]}")
    if mode not in ("mean", "max"):
        raise ValueError(f"mode must be 'mean' or 'max', got {mode!r}")
    if size is None:
        size = max((tuple(m.shape[2:]) for m in maps), key=lambda s: s[0] * s[1])
    ups = torch.stack([upsample(normalize(m) if normalize_each else m, size) for m in maps])
    return ups.mean(dim=0) if mode == "mean" else ups.amax(dim=0)
