"""The images of a dataset run: which files a folder holds (``list_images``), listed paths made canonical
(``normalise_paths``), and their decoding in a DataLoader where a bad file is a recorded reason, never an exception.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Sequence

import torch
from torch import Tensor

from funcam._src.app.images import ImageError, limit_aspect, read_image
from funcam._src.app.models import preprocess
from funcam._src.app.shards import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".avif")


def list_images(root: str, *, exclude: str | None = None) -> list[str]:
    """Image files under ``root`` (by suffix, recursively), as sorted relative POSIX paths; skips ``exclude`` and
    hidden names. Follows symbolic links to folders but walks each real folder once, so a link to a parent
    neither repeats images nor loops forever. Whatever matches the suffix is listed (a pipe or a folder-like
    name included): what cannot be read is refused later and recorded in ``errors.jsonl``."""
    if not os.path.isdir(root):
        raise DatasetError(f"images folder {root!r} is not a directory")
    skip = os.path.realpath(exclude) if exclude else None
    seen = {os.path.realpath(root)}
    found = []
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):  # sorted: which of two links to one folder is walked does not depend on the OS
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real != skip and real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        rel = os.path.relpath(dirpath, root)
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def normalise_paths(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> list[str]:
    """Listed image paths (relative to ``root``) as sorted POSIX paths, each normalised and listed once:
    ``./x.png``, ``sub/../x.png`` and ``../DIR/x.png`` (leaving ``root`` and coming back in) are all ``x.png``;
    a path outside ``root`` (``../x.png``) stays a file of its own."""
    base = os.path.realpath(root) if root is not None else None
    out = set()
    for p in paths:
        rel = posixpath.normpath(os.fsdecode(p).replace(os.sep, "/"))
        if base is not None and rel.startswith("../"):
            back = os.path.relpath(os.path.normpath(os.path.join(base, rel)), base)
            if not back.startswith(".."):
                rel = posixpath.normpath(back.replace(os.sep, "/"))
        out.add(rel)
    return sorted(out)


class Images(torch.utils.data.Dataset):
    """Item ``i`` -> ``(i, x (3, S, S) or None, reason or None)``: a bad file becomes a reason, never an exception."""

    def __init__(self, root: str, paths: Sequence[str], config: Any):
        self.root, self.paths, self.config = root, paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = os.path.join(self.root, self.paths[i])
        try:
            return i, preprocess([limit_aspect(read_image(path))], self.config)[0], None
        except ImageError as e:
            return i, None, e.reason if e.path == path else str(e)
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a dataset run
            return i, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def collate(items: list) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    """Stack the readable images ``(b, 3, S, S)``; carry the failures ``(index, reason)`` alongside."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, _, err in items if err is not None]
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None), errors

