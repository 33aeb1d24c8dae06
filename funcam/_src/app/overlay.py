"""PNG overlays for dataset runs: ``OUT/overlays/<folders>/<name>__<class>__<method>.png``, one per image and
explained class (the ``MAX_OVERLAYS`` highest-scoring of them), each labelled: the model's input crop and the
class map over it, with the class, its probability, the method and a colour scale.

Names are an injective function of the (normalised) relative path, the class and the method, so two inputs
never share an overlay, a folder never collides with a file, and a resumed or re-sharded run writes the same
names:

* folders keep their names, percent-escaped where needed: ``%`` always (``%25``), a ``..`` (a ``--list``
  entry outside DIR) as ``%2E%2E``, an absolute path's root as ``%2F`` (``//`` as ``%2F/%00``), and the last
  letter of a folder named
  ``*.png`` (``x.png/`` -> ``x.pn%67/``), so no folder name ends like an overlay file;
* the file is the input's name (``%`` escaped) + ``__<class>__<method>.png``: ``x.png`` -> ``x.png__281__gradcam.png``,
  next to ``x.jpg`` -> ``x.jpg__281__gradcam.png``. A name too long for the filesystem keeps its first 150 bytes
  and a hash of the rest (``%~`` marks it; an escaped name never contains ``%~``).
"""
from __future__ import annotations

import hashlib
import os
import posixpath

import torch
import torch.nn.functional as F
from torch import Tensor

from funcam._src.app.explain import METHOD_TITLES, drawn_as_gradient, method_of
from funcam._src.app.render import gradient_image, grid, overlay, save_png, to_uint8

MAX_OVERLAYS = 5   # per image: the highest-scoring explained classes (all of them for K <= 5)
MAX_NAME = 200     # bytes of the escaped input name before it is shortened (file names stop at 255)


def _escape(part: str) -> str:
    return part.replace("%", "%25")


def overlay_name(path: str, cls: int, method: str) -> str:
    """The overlay of image ``path`` (relative to DIR, as listed), class ``cls`` and ``method``, relative to
    ``OUT/overlays`` (POSIX separators). See the module docstring for the rules."""
    norm = posixpath.normpath(path.replace(os.sep, "/"))
    parts = norm.split("/")
    folders = []
    if parts[0] == "":  # an absolute path: its root becomes a folder of its own ("%2F": no escaped name is that)
        folders.append("%2F")
        parts = parts[1:]
    for p in parts[:-1]:
        p = "%2E%2E" if p == ".." else "%00" if p == "" else _escape(p)  # "": POSIX keeps a leading "//"
        if p.lower().endswith(".png"):
            p = f"{p[:-1]}%{ord(p[-1]):02X}"
        folders.append(p)
    name = _escape(parts[-1])
    raw = os.fsencode(name)
    if len(raw) > MAX_NAME:
        name = os.fsdecode(raw[:150]) + "%~" + hashlib.sha256(raw).hexdigest()[:16]
    return "/".join(folders + [f"{name}__{int(cls)}__{method}.png"])


def choose(logits: Tensor, classes: Tensor, k: int = MAX_OVERLAYS) -> Tensor:
    """Positions (n, min(K, k)) of each image's highest-scoring explained classes, best first.
    logits (n, N), classes (n, K)."""
    scores = logits.gather(1, classes)
    return scores.topk(min(k, classes.shape[1]), dim=1).indices


def overlay_tiles(x: Tensor, maps: Tensor, config, *, guided: bool) -> Tensor:
    """The crop and the rendered maps: x normalised ``(n, 3, S, S)``, maps ``(n, K, h, w)`` -> ``uint8
    (n, 1 + K, 3, S, S)``: the crop, then each map over it (``funcam.render.overlay``, per-map scaled "jet"),
    or, for the guided methods, drawn as a gradient image (``funcam.render.gradient_image``)."""
    crops = to_uint8(x, mean=config.mean, std=config.std)
    if guided:
        up = F.interpolate(maps.float(), size=crops.shape[-2:], mode="bilinear", align_corners=False)
        shown = gradient_image(up.unsqueeze(2))
    else:
        shown = overlay(crops, maps.float(), mean=None, std=None)  # (n, K, 3, S, S)
    return torch.cat([crops.unsqueeze(1), shown], dim=1)


def write_overlays(out: str, paths: list[str], x: Tensor, maps: Tensor, classes: Tensor, logits: Tensor, config,
                   method: str, names: list[str] | None) -> None:
    """The overlays of a batch of images (see the module docstring), each written atomically; ``names``: class
    names by index (None: shown as ``class N``)."""
    guided = drawn_as_gradient(method_of(method))
    tiles = overlay_tiles(x, maps, config, guided=guided)
    probs = logits.float().softmax(-1).gather(1, classes)
    title = METHOD_TITLES.get(method, method)
    for i, path in enumerate(paths):
        for k in choose(logits[i:i + 1], classes[i:i + 1])[0].tolist():
            c = int(classes[i, k])
            label = f"{names[c] if names else f'class {c}'} {float(probs[i, k]):.2f}"
            img = grid(torch.stack([tiles[i, 0], tiles[i, 1 + k]])[None], row_labels=[title],
                       col_labels=["input", label], legend=None if guided else "jet",
                       legend_text=None)
            dest = os.path.join(out, "overlays", *overlay_name(path, c, method).split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            save_png(img, dest)
