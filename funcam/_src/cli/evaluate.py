"""``funcam evaluate IMAGE_OR_DIR... --out DIR``: score explanation methods with quality metrics, beside model-free
baselines.

    funcam evaluate photos/ --method gradcam,gradcampp --metrics deletion_insertion,sparseness --top-k 1 --out eval/

Per batch of images: the classes (--classes, or the --top-k of the model's logits), each method's maps
(``funcam.explain.explain``) and each baseline's (random maps drawn from --seed, a centre prior, Sobel edges;
``funcam.metrics.BASELINES``), all upsampled to the model's input size; then every metric scores every map set,
one ``funcam.metrics`` call each (``funcam._src.app.scoring``: its options). Writes ``OUT/scores.csv`` (a row per
image, class and method), ``OUT/summary.csv`` (method x metric, the mean over images and classes, NaN left out) and
``OUT/scores.json`` (both, with the settings and which direction is better), and prints the summary.

Everything that needs no model is checked first (metrics, baselines, numbers, --out, device, images, weights,
method names), then the methods and classes on one blank image; a bad option is one ``funcam: error:`` line,
exit 2. An unreadable image is named on stderr and skipped (exit 1); none readable: exit 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Sequence

import torch
from tqdm import tqdm

from funcam._src.app.explain import check_method, explain
from funcam._src.app.files import write_text
from funcam._src.app.folder import list_images
from funcam._src.app.images import ImageError, limit_aspect, printable
from funcam._src.app.models import class_names, preprocess
from funcam._src.app.scoring import BASELINE_NAMES, METRICS, Settings, baseline_maps
from funcam._src.cli.batch import Item, probed, readable_batches
from funcam._src.cli.options import (
    UsageError,
    add_batch_size_argument,
    add_device_argument,
    add_memory_arguments,
    add_model_arguments,
    add_target_arguments,
    cannot_write,
    check_fit,
    check_out,
    classes_from_args,
    layers,
    load_from_args,
    method_options,
    methods_from_args,
    parse_device,
    positive,
    targets_from_args,
    weights_from_args,
    weights_note,
)
from funcam._src.core.engine import resolve_classes
from funcam._src.core.postprocess import upsample

DEFAULT_METRICS = "deletion_insertion,pixel_flipping,sparseness"
DEFAULTS = Settings._field_defaults


def add_parser(sub) -> None:
    """Add ``evaluate`` to the subcommands ``sub``."""
    p = sub.add_parser("evaluate", help="score methods with quality metrics, beside random / centre / Sobel maps",
                       description="Score explanation methods on images with funcam.metrics, beside random, centre "
                                   "and Sobel maps: OUT/scores.csv (per image, class and method), OUT/summary.csv "
                                   "(the means), OUT/scores.json (both, with the settings).")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders (walked recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: scores.csv, summary.csv, scores.json")
    p.add_argument("--metrics", default=DEFAULT_METRICS, metavar="NAME[,NAME...]",
                   help=f"some of {', '.join(METRICS)} (default {DEFAULT_METRICS})")
    p.add_argument("--baselines", default=",".join(BASELINE_NAMES), metavar="NAME[,NAME...]",
                   help=f"model-free maps scored beside the methods: some of {', '.join(BASELINE_NAMES)}, or none "
                        f"(default all)")
    p.add_argument("--steps", type=positive, default=DEFAULTS["steps"], metavar="N",
                   help=f"perturbation steps per map (default {DEFAULTS['steps']}): pixel flipping, faithfulness "
                        f"estimate, monotonicity (each C*H*W/N features), region perturbation (N regions), "
                        f"deletion / insertion, faithfulness correlation (N runs)")
    p.add_argument("--patch-size", type=positive, default=DEFAULTS["patch_size"], metavar="PX",
                   help=f"square patches of region perturbation and selectivity (default {DEFAULTS['patch_size']})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the random maps and random draws")
    add_target_arguments(p, several_methods=True)
    add_model_arguments(p)
    add_batch_size_argument(p)
    add_memory_arguments(p)
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    p.set_defaults(run=run)


def names_from(text: str, known: Sequence[str], option: str, *, none: bool = False) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``known`` (``-`` and ``_`` alike), listed once; ``none`` allows
    ``"none"`` for an empty list. ``UsageError`` naming the option, the value and the choices."""
    items = [t.strip().replace("-", "_") for t in text.split(",") if t.strip()]
    if none and items == ["none"]:
        return []
    bad = [t for t in items if t not in known]
    if bad or not items:
        extra = ", or none" if none else ""
        raise UsageError(f"{option}: unknown name {(bad or [text])[0]!r}; expected a comma-separated list of "
                         f"{', '.join(known)}{extra}")
    return list(dict.fromkeys(items))


def image_paths(args: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their images (recursively, sorted); ``UsageError`` for a path that is
    neither, or a folder without images."""
    out = []
    for a in args:
        if os.path.isdir(a):
            found = list_images(a)
            if not found:
                raise UsageError(f"folder {printable(a)} holds no image files")
            out.extend(os.path.join(a, f) for f in found)
        elif os.path.exists(a):
            out.append(a)
        else:
            raise UsageError(f"{printable(a)}: no such file or folder")
    return out


def _table(summary: dict[str, dict[str, float]], directions: dict[str, str]) -> str:
    """The summary as aligned text: a row per method, a column per metric column (arrow: which way is better)."""
    cols = list(directions)
    head = ["method"] + [f"{c} {'↑' if directions[c] == 'higher' else '↓'}" for c in cols]
    rows = [[m] + [f"{v[c]:.4g}" for c in cols] for m, v in summary.items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head)] + [line(r) for r in rows])


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _write(out: str, result: dict) -> None:
    """``OUT/scores.csv`` (the rows), ``OUT/summary.csv`` (method x column) and ``OUT/scores.json`` (both, with the
    run's settings), each written atomically."""
    cols = list(result["better"])
    try:
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, "scores.csv"), _csv(result["scores"],
                                                         ["image", "rank", "class", "class_name", "method", *cols]))
        write_text(os.path.join(out, "summary.csv"), _csv([{"method": s, **v} for s, v in result["summary"].items()],
                                                          ["method", *cols]))
        write_text(os.path.join(out, "scores.json"), json.dumps(result, indent=1, allow_nan=True))
    except OSError as e:  # a full disk, a read-only --out, ...
        raise cannot_write(e, out) from None


def _score_batch(batch: list, model, pre, device: torch.device, targets: dict, options: dict, baselines: list[str],
                 metrics: list[str], classes, top_k, settings: Settings, generator: torch.Generator,
                 bar: tqdm) -> list[dict]:
    """The rows of one batch of ``Item`` (their images read): for every image, class and map set (the methods', then the
    baselines'), the value of every metric column. options: per method, what ``explain`` takes beside it."""
    x = preprocess([limit_aspect(it.image) for it in batch], pre).to(device)
    with torch.no_grad():
        idx = resolve_classes(classes, top_k, model(x))  # (B, K)
    maps = {m: explain(t, x, method=m, classes=idx, **options[m]).maps for m, t in targets.items()}
    maps.update({f"baseline:{b}": baseline_maps(b, x, idx, generator) for b in baselines})
    scores: dict[str, dict[str, torch.Tensor]] = {s: {} for s in maps}
    for s, m in maps.items():
        a = upsample(m.float(), x.shape[-2:])
        for name in metrics:
            bar.set_postfix_str(f"{s} {name}", refresh=False)
            scores[s].update(METRICS[name].score(model, x, a, idx, settings))
            bar.update(len(batch))
    names = class_names(model)
    rows = []
    for i, it in enumerate(batch):
        for k, c in enumerate(idx[i].tolist()):
            for s in maps:
                row = {"image": printable(it.label), "rank": k, "class": c, "class_name": names[c] if names else "",
                       "method": s}
                row.update({col: float(v[i, k]) for col, v in scores[s].items()})
                rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    # --- checks that need no model
    metrics = names_from(args.metrics, list(METRICS), "--metrics")
    baselines = names_from(args.baselines, BASELINE_NAMES, "--baselines", none=True)
    classes, top_k = classes_from_args(args)
    settings = Settings(args.steps, args.patch_size, args.seed, args.max_memory)
    out = check_out(args.out)
    device = parse_device(args.device)
    if args.method is not None:
        try:
            [check_method(m.strip()) for m in args.method.split(",")]
        except ValueError as e:
            raise UsageError(f"--method: {e}") from None
    given = image_paths(args.images)
    # each file that is not an image is named on stderr at once, before any model loads
    items = probed([Item(p, p, None) for p in given], lambda line: print(line, file=sys.stderr))
    failed = len(given) - len(items)
    if not items:
        return 2
    weights = weights_from_args(args)
    # --- the model, then the methods and classes on one blank image; still nothing written
    model, pre = load_from_args(weights, device)
    methods = methods_from_args(args, model)
    options = method_options(args, methods)
    targets = targets_from_args(model, methods, layers(args.layer))
    check_fit(targets, pre, classes=classes, top_k=top_k, options=options)
    note = weights_note(weights)
    if note:
        print(f"funcam: warning: {note}", file=sys.stderr)
    directions = {c: d for m in metrics for c, d in METRICS[m].columns.items()}
    explain_options = {m: dict(options[m], chunk_size=args.chunk_size, max_memory=args.max_memory) for m in methods}
    generator = torch.Generator().manual_seed(args.seed)  # the random maps, batch after batch
    sets = methods + [f"baseline:{b}" for b in baselines]
    rows: list[dict] = []
    bar = tqdm(total=len(items) * len(sets) * len(metrics), unit="score", file=sys.stderr, disable=args.quiet or None)

    def on_error(it: Item, e: ImageError) -> None:
        nonlocal failed
        failed += 1
        bar.write(f"funcam: error: {e}", file=sys.stderr)

    for batch in readable_batches(items, args.batch_size, on_error):
        rows += _score_batch(batch, model, pre, device, targets, explain_options, baselines, metrics, classes, top_k,
                             settings, generator, bar)
    bar.close()
    if not rows:
        return 2  # no readable image: each was named on stderr, nothing was written
    summary = {s: {c: _mean([r[c] for r in rows if r["method"] == s]) for c in directions} for s in sets}
    result = {"model": weights.name, "random_weights": note is not None, "methods": methods, "baselines": baselines,
              "metrics": metrics, "better": directions, "settings": settings._asdict(),
              "images": len({r["image"] for r in rows}), "unreadable": failed, "summary": summary, "scores": rows}
    _write(out, result)
    if not args.quiet:
        print(_table(summary, directions))
        print(f"wrote {os.path.join(out, 'scores.csv')}, summary.csv, scores.json")
    return 1 if failed else 0
