"""One batch of ``funcam explain``: every method's maps for the batch, then each image's files (overlays, the input,
the comparison grid, or one npz), captioned by class (name and probability) or by the task's columns (a prompt and
its zero-shot probability, a box and its score or "no match", ``funcam._src.cli.targets``); a task's boxes are drawn
on their maps. Each file is written atomically; names never leave ``--out``.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from funcam._src.app.explain import METHOD_TITLES
from funcam._src.app.files import write_npz
from funcam._src.app.gallery import Figure, Section
from funcam._src.app.images import ImageError, limit_aspect, printable, probe_image, read_image
from funcam._src.app.models import Preprocess, preprocess, unnormalize
from funcam._src.app.render import draw_boxes, gradient_image, grid, overlay, save_png
from funcam._src.base import CAM
from funcam._src.cli.options import UsageError
from funcam._src.cli.targets import Task
from funcam._src.core.targets import UnmatchedBoxWarning
from funcam._src.guard import ZeroMapWarning


class Item(NamedTuple):
    stem: str              # sanitised output name
    label: str             # what the user called it (a path, or a sample name)
    image: Tensor | None   # uint8 (3, H, W), or None: read ``label`` when its batch comes


class Result(NamedTuple):
    """One method's output for a batch: ``cam`` as ``funcam.explain.explain`` returns it (maps (B, K, h, w)),
    and for the methods drawn as gradient images the signed gradients ``rgb (B, K, 3, H, W)`` they are drawn from."""
    cam: CAM
    rgb: Tensor | None


def probed(items: Sequence[Item], report: Callable[[str], None]) -> list[Item]:
    """The items whose file passes ``probe_image`` (exists, a regular non-empty file, an image header within
    the pixel limit); each other one is reported at once, before any model loads."""
    ok = []
    for it in items:
        if it.image is None:
            try:
                probe_image(it.label)
            except ImageError as e:
                report(f"funcam: error: {e}")  # e names the file (printable), one line
                continue
        ok.append(it)
    return ok


def readable_batches(items: Sequence[Item], batch_size: int, on_error: Callable[[Item, ImageError], None]):
    """Batches of up to ``batch_size`` items with their images decoded; unreadable ones go to ``on_error``."""
    batch = []
    for it in items:
        if it.image is None:
            try:
                it = it._replace(image=read_image(it.label))
            except ImageError as e:
                on_error(it, e)
                continue
        batch.append(it)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def inside(out: str, name: str) -> str:
    path = os.path.join(out, name)
    if os.path.dirname(os.path.realpath(path)) != out:  # belt and braces: safe_stem already allows no separators
        raise UsageError(f"refusing to write {name!r} outside --out {out!r}")
    return path


def same_size(chunk: list[Item]) -> list[list[Item]]:
    """The chunk in runs of images of one size (a detector takes each image as it is)."""
    groups: list[list[Item]] = []
    for it in chunk:
        if groups and groups[-1][0].image.shape == it.image.shape:
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups


def explain_batch(chunk: list[Item], targets: dict, fns: dict, names: list | None, *, classes, top_k, pre: Preprocess,
           device: torch.device, quiet: bool, out: str, fmt: str, cmaps: dict, alpha: float, note: str | None,
           task: Task | None, write: Callable) -> list[Section]:
    """One batch: every method's maps, then each image's files; returns its gallery sections."""
    methods = list(targets)
    if task is None:
        # limit_aspect: a 1 x 5000 image would otherwise be resized to 256 x 1,280,000 before the centre crop
        x = preprocess([limit_aspect(it.image) for it in chunk], pre).to(device)
        score, labels = None, None
    else:
        x = task.prepare([it.image for it in chunk]).to(device)
        score, labels = task.score_for(targets[methods[0]], x)
    results: dict[str, Result] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnmatchedBoxWarning)  # said below, once per image and box
        warnings.simplefilter("always", ZeroMapWarning)
        for m in methods:  # the first method resolves top_k; the others explain the same classes
            first = next(iter(results.values()), None)
            results[m] = fns[m](x, score, None) if score is not None else fns[m](x, classes, top_k) \
                if first is None else fns[m](x, first.cam.classes, None)
    first = results[methods[0]].cam
    for w in caught:  # zero maps of unmatched boxes are said per box below; any other warning as it came
        if not issubclass(w.category, (UnmatchedBoxWarning, ZeroMapWarning)) or (
                issubclass(w.category, ZeroMapWarning) and task is None):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if task is None:
        idx = first.classes.cpu()
        probs = first.logits.detach().float().softmax(-1).cpu().gather(1, idx)
    shown = unnormalize(x.detach(), pre).cpu()
    os.makedirs(out, exist_ok=True)
    sections = []
    for b, it in enumerate(chunk):
        it = it._replace(label=printable(it.label))
        if task is None:
            label = [names[c] if names else f"class {c}" for c in idx[b].tolist()]
            cols = [f"{n} {p:.2f}" for n, p in zip(label, probs[b].tolist())]
            caps = [f"{n} ({p:.2f})" for n, p in zip(label, probs[b].tolist())]
            tags, ok = [f"c{c}" for c in idx[b].tolist()], None
        else:
            cols, caps, tags, ok = task.columns(first.logits, score, labels, b)
            for k in (k for k, m in enumerate(ok) if not m):  # never silently: a zero map, said so
                write(f"funcam: warning: {it.label}: {task.names[k]} matches no detection (IoU > 0.5 with its "
                      f"label): its map is zero", file=sys.stderr)
        if not quiet:
            shown_line = ", ".join(cols) if task is not None else \
                ", ".join(f"{n} {p:.3f}" for n, p in zip(label, probs[b].tolist()))
            write(f"{it.label}: {shown_line}" + (" (random weights)" if note else ""), file=sys.stdout)
        if fmt == "npz":
            arrays = {f"maps_{m.replace('-', '_')}": r.cam.maps[b].detach().float().cpu().numpy()
                      for m, r in results.items()}
            if task is None:
                arrays.update(classes=idx[b].numpy(), probabilities=probs[b].numpy(), class_names=np.array(label))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UnmatchedBoxWarning)
                    values = score(first.logits)[b].detach().float().cpu().numpy()
                arrays.update({task.kind: np.array(task.names), "captions": np.array(cols), "scores": values,
                               "matched": np.array(ok)})
                if task.boxes is not None:
                    arrays.update(box_coords=task.boxes.numpy(), box_labels=labels[b].cpu().numpy())
            arrays.update(methods=np.array(methods), source=np.array(it.label),
                          random_weights=np.array(note is not None))
            write_npz(inside(out, f"{it.stem}.npz"), arrays)
            continue
        sections.append(write_pngs(out, it, shown[b], results, b, tags, cols, caps, cmaps=cmaps, alpha=alpha,
                                    note=note, boxes=task.boxes if task is not None else None,
                                    what="scores" if task is not None else "predicted"))
    return sections


def write_pngs(out: str, it: Item, shown: Tensor, results: dict, b: int, tags: list, cols: list, caps: list,
                *, cmaps: dict, alpha: float, note: str | None, boxes: Tensor | None = None,
                what: str = "predicted") -> Section:
    """Overlays ``{stem}_{method}_{tag}.png`` (tag ``c{class}``, ``p{prompt}``, ``box{n}``), the input
    ``{stem}_input.png``, the grid ``{stem}_grid.png`` (rows = methods, columns = the input and the K maps, a colour
    scale under heatmap rows); ``boxes (K, 4)``: map k's box drawn on it."""
    tiles, rows = [], []
    tag = "[random weights] " if note else ""
    for m, r in results.items():
        if r.rgb is not None:  # guided: the gradient itself, as an image
            over = gradient_image(r.rgb[b:b + 1].detach().float().cpu())[0]  # (K, 3, S, S)
        else:
            over = overlay(shown[None], r.cam.maps[b:b + 1].detach().float().cpu(), alpha=alpha, cmap=cmaps[m])[0]
        if boxes is not None:
            over = draw_boxes(over, boxes)
        tiles.append(torch.cat([shown[None], over]))
        row = [Figure(f"{it.stem}_input.png", f"{it.label} (model input)")]
        for k, t in enumerate(tags):
            name = f"{it.stem}_{m}_{t}.png"
            save_png(over[k], inside(out, name))
            row.append(Figure(name, f"{tag}{METHOD_TITLES.get(m, m)}: {caps[k]}"))
        rows.append(row)
    save_png(shown, inside(out, f"{it.stem}_input.png"))
    titles = [METHOD_TITLES.get(m, m) for m in results]
    heat = [m for m, r in results.items() if r.rgb is None]
    g = grid(torch.stack(tiles), row_labels=titles, col_labels=[tag.strip() or "input"] + list(cols),
             legend=cmaps[heat[0]] if heat else None, row_label_width=140)
    save_png(g, inside(out, f"{it.stem}_grid.png"))
    return Section(it.label, f"{tag}{what}: {', '.join(cols)}", rows,
                   Figure(f"{it.stem}_grid.png", "comparison grid (PNG)"))
