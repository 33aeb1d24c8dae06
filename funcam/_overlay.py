"""PNG overlays for dataset runs: the model's input crop next to up to four class maps blended over it."""
from __future__ import annotations

import os

import torch
from torch import Tensor

MAX_PANELS = 4


def overlay_strip(x: Tensor, maps: Tensor, config) -> Tensor:
    """x: normalised ``(n, 3, S, S)``; maps ``(n, K, h, w)`` -> ``uint8 (n, 3, S, (1 + min(K, 4)) * S)``: the
    crop, then each of the first classes' maps (``funcam.render.overlay``, per-map scaled "jet")."""
    from funcam.render import overlay, to_uint8

    crops = to_uint8(x, mean=config.mean, std=config.std)
    heat = overlay(crops, maps[:, :MAX_PANELS].float(), mean=None, std=None)  # (n, K', 3, S, S)
    return torch.cat([crops.unsqueeze(1), heat], dim=1).permute(0, 2, 3, 1, 4).flatten(3)


def write_overlays(out: str, paths: list[str], x: Tensor, maps: Tensor, config) -> None:
    """One PNG per image at ``OUT/overlays/<path>.png``, each written atomically."""
    from PIL import Image

    from funcam._shards import atomic_write

    strips = overlay_strip(x, maps, config)
    for path, strip in zip(paths, strips):
        # keep listed paths like ../x.jpg or /data/x.jpg inside OUT/overlays
        rel = "/".join(p for p in path.replace(os.sep, "/").split("/") if p not in ("", ".", ".."))
        dest = os.path.join(out, "overlays", rel + ".png")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        arr = strip.permute(1, 2, 0).numpy()
        atomic_write(dest, lambda tmp, a=arr: Image.fromarray(a).save(tmp, format="PNG"))
