"""What ``funcam explain`` and ``funcam demo`` do once the command line is parsed (see ``funcam.cli``).

Images are decoded batch by batch (never all at once). A file that cannot be used (``funcam.images.read_image``
refuses it: missing, not an image, truncated, a decompression bomb, ...) gets one ``funcam: error: FILE: why``
line on stderr and the run goes on. Per batch of readable images: one call per method (the first method picks
the classes, the others explain the same ones), then per image its files, each written atomically, so an image
either has all its outputs or none. Names are shown through ``printable`` (a newline or an undecodable byte in
a file name is escaped), so each message stays one line and the gallery stays valid UTF-8.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from funcam.cli import METHOD_TITLES, UsageError, class_names, methods_from_args, model_from_args, \
    parse_classes, safe_stem, _device, _layers
from funcam.gallery import Figure, Section, write_gallery
from funcam.grads import CAM
from funcam.images import ImageError, limit_aspect, printable, read_image
from funcam.models import ModelError, Preprocess, preprocess, unnormalize
from funcam.render import grid, overlay, save_png


class Item(NamedTuple):
    stem: str              # sanitised output name
    label: str             # what the user called it (a path, or a sample name)
    image: Tensor | None   # uint8 (3, H, W), or None: read ``label`` when its batch comes


def _explainer(model: nn.Module, method: str, layer, relu: bool, compile_: bool) -> Callable[..., CAM]:
    from funcam.explain import explain

    def fn(x: Tensor, classes, top_k):
        return explain(model, x, method=method, classes=classes, top_k=top_k, layer=layer, relu=relu)

    return torch.compile(fn) if compile_ else fn


def _output_options(args: argparse.Namespace) -> tuple[str, str, bool]:
    """Validated ``(out folder (real path), cmap, relu)``."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
    return os.path.realpath(args.out), (args.cmap or ("bwr" if args.signed else "jet")), not args.signed


def _inside(out: str, name: str) -> str:
    path = os.path.join(out, name)
    if os.path.dirname(os.path.realpath(path)) != out:  # belt and braces: safe_stem already allows no separators
        raise UsageError(f"refusing to write {name!r} outside --out {out!r}")
    return path


def _save_npz(path: str, arrays: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _readable(items: Sequence[Item], batch_size: int, on_error: Callable[[Item, ImageError], None]):
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


def _run(model: nn.Module, pre: Preprocess, items: Sequence[Item], methods: Sequence[str], *, classes, top_k,
         layer, relu: bool, compile_: bool, batch_size: int, device: torch.device, quiet: bool, out: str,
         fmt: str, cmap: str, alpha: float) -> tuple[list[Section], int]:
    """Explain and write every readable item; returns the gallery sections and the number of unreadable items.
    ``out`` is created before the first file is written (not at all when no item is readable)."""
    from tqdm import tqdm

    fns = {m: _explainer(model, m, layer, relu, compile_) for m in methods}
    names = class_names(model)
    sections, failed = [], 0
    bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=True if quiet or len(items) < 2 else None)

    def on_error(it: Item, e: ImageError) -> None:
        nonlocal failed
        failed += 1
        bar.write(f"funcam: error: {e}", file=sys.stderr)  # e names the file (printable), one line
        bar.update(1)

    for chunk in _readable(items, batch_size, on_error):
        # limit_aspect: a 1 x 5000 image would otherwise be resized to 256 x 1,280,000 before the centre crop
        x = preprocess([limit_aspect(it.image) for it in chunk], pre).to(device)
        results = {}
        for m in methods:  # the first method resolves top_k; the others explain the same classes
            first = next(iter(results.values()), None)
            results[m] = (fns[m](x, classes, top_k) if first is None else fns[m](x, first.classes, None))
        first = results[methods[0]]
        idx = first.classes.cpu()
        probs = first.logits.detach().float().softmax(-1).cpu().gather(1, idx)
        shown = unnormalize(x.detach(), pre).cpu()
        os.makedirs(out, exist_ok=True)
        for b, it in enumerate(chunk):
            it = it._replace(label=printable(it.label))
            label = [names[c] if names else f"class {c}" for c in idx[b].tolist()]
            if not quiet:
                bar.write(f"{it.label}: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(label, probs[b].tolist())),
                          file=sys.stdout)
            if fmt == "npz":
                arrays = {f"maps_{m.replace('-', '_')}": r.maps[b].detach().float().cpu().numpy()
                          for m, r in results.items()}
                arrays.update(classes=idx[b].numpy(), probabilities=probs[b].numpy(),
                              class_names=np.array(label), methods=np.array(list(methods)),
                              source=np.array(it.label))
                _save_npz(_inside(out, f"{it.stem}.npz"), arrays)
                continue
            sections.append(_write_pngs(out, it, shown[b], results, b, idx[b].tolist(), label, probs[b].tolist(),
                                        cmap=cmap, alpha=alpha))
        bar.update(len(chunk))
    bar.close()
    return sections, failed


def _write_pngs(out: str, it: Item, shown: Tensor, results: dict, b: int, idx: list, label: list, probs: list,
                *, cmap: str, alpha: float) -> Section:
    """Overlays ``{stem}_{method}_c{class}.png``, the input ``{stem}_input.png``, the grid ``{stem}_grid.png``."""
    tiles, rows = [], []
    for m, r in results.items():
        over = overlay(shown[None], r.maps[b:b + 1].detach().float().cpu(), alpha=alpha, cmap=cmap)[0]  # (K,3,S,S)
        tiles.append(torch.cat([shown[None], over]))
        row = [Figure(f"{it.stem}_input.png", f"{it.label} (model input)")]
        for k, c in enumerate(idx):
            name = f"{it.stem}_{m}_c{c}.png"
            save_png(over[k], _inside(out, name))
            row.append(Figure(name, f"{METHOD_TITLES.get(m, m)}: {label[k]} ({probs[k]:.2f})"))
        rows.append(row)
    save_png(shown, _inside(out, f"{it.stem}_input.png"))
    titles = [METHOD_TITLES.get(m, m) for m in results]
    g = grid(torch.stack(tiles), row_labels=titles, col_labels=["input"] + [f"{n} {p:.2f}" for n, p in zip(label, probs)])
    save_png(g, _inside(out, f"{it.stem}_grid.png"))
    predicted = ", ".join(f"{n} {p:.2f}" for n, p in zip(label, probs))
    return Section(it.label, f"predicted: {predicted}", rows, Figure(f"{it.stem}_grid.png", "comparison grid (PNG)"))


def explain_command(args: argparse.Namespace) -> int:
    out, cmap, relu = _output_options(args)
    model, pre = model_from_args(args)
    methods = methods_from_args(args, model)
    classes = parse_classes(args.classes) if args.classes is not None else None
    top_k = None if classes is not None else (args.top_k or min(3, getattr(model, "num_classes", 3) or 3))
    used = {"index"}
    items = [Item(safe_stem(path, used), path, None) for path in args.images]
    try:
        sections, failed = _run(model, pre, items, methods, classes=classes, top_k=top_k,
                                layer=_layers(args.layer), relu=relu, compile_=args.compile,
                                batch_size=args.batch_size, device=torch.device(args.device), quiet=args.quiet,
                                out=out, fmt=args.format, cmap=cmap, alpha=args.alpha)
        if failed == len(items):
            return 2  # no readable image: each was named on stderr, nothing was written
        if args.format == "png":
            page = write_gallery(out, sections, title="funcam explain",
                                 intro=f"model {args.model or 'efficientnet_lite0'}, methods {', '.join(methods)}")
            if not args.quiet:
                print(f"wrote {page}")
    except OSError as e:  # a full disk, a read-only --out, ...
        where = printable(os.fsdecode(e.filename)) if e.filename else printable(out)
        raise UsageError(f"cannot write {where}: {e.strerror or type(e).__name__}") from None
    return 1 if failed else 0


def demo_command(args: argparse.Namespace) -> int:
    from funcam.images import SAMPLES, sample_images
    from funcam.models import load_model

    out, cmap, relu = _output_options(args)
    device = _device(args.device)
    try:
        model, pre = load_model("efficientnet_lite0")
        photos = sample_images()
    except (ModelError, ImageError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    items = [Item(name, name, photos[name]) for name in SAMPLES]
    methods = ["gradcam", "gradcampp"]
    # One batched call per method for all six photos (B=6, K=3).
    sections, _ = _run(model.to(device), pre, items, methods, classes=None, top_k=3, layer=None, relu=relu,
                    compile_=False, batch_size=len(items), device=device, quiet=args.quiet, out=out, fmt="png",
                    cmap=cmap, alpha=args.alpha)
    page = write_gallery(out, sections, title="funcam demo",
                         intro="EfficientNet-Lite0 (ImageNet weights), top-3 classes per photo, Grad-CAM and "
                               "Grad-CAM++ from one batched call each; overlays on the model's 224x224 input.")
    if not args.quiet:
        print(f"wrote {page}")
    return 0
