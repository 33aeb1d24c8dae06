"""``funcam explain-dir DIR --out OUT``: explain a folder of images, resumably (``funcam.explain_dataset``).

Single process:   funcam explain-dir photos/ --out cams/ --top-k 5 --workers 4
Several:          torchrun --nproc-per-node 4 -m funcam.cli explain-dir photos/ --out cams/ --top-k 5

Everything is checked before ``OUT/settings.json`` is written: the options, DIR (or --list), --out, the
device, the model and its weights, then, with the model loaded, the method, layer and classes on one blank
image. A file that cannot be read is named on stderr as it is met (``funcam: error: PATH: why``) and recorded
in ``OUT/errors.jsonl``; the run goes on. Exit codes: 0 every image explained; 1 some images unreadable (all
the others written); 2 nothing could be explained (a usage error, another run holding --out, or no readable
image).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from funcam._src.app.dataset import DatasetJob, explain_dataset
from funcam._src.app.images import printable
from funcam._src.app.shards import DatasetError
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


def add_parser(sub) -> None:
    """Add ``explain-dir`` to the subcommands ``sub``."""
    p = sub.add_parser("explain-dir", help="explain a folder of images (an image dataset)",
                       description=__doc__.splitlines()[0])
    p.add_argument("dir", help="folder of images (walked recursively); with --list, the root of the listed paths")
    p.add_argument("--out", required=True, help="output folder (shards, manifest.jsonl, errors.jsonl); resumable")
    p.add_argument("--list", metavar="FILE", help="text file of image paths relative to DIR, one a line")
    add_target_arguments(p, several_methods=False, all_classes=True)
    add_model_arguments(p)
    add_batch_size_argument(p)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: decode in-process)")
    p.add_argument("--shard-size", type=positive, default=256, help="images per shard file")
    add_memory_arguments(p)
    p.add_argument("--format", choices=("safetensors", "npz"), default="safetensors")
    p.add_argument("--overlays", action="store_true",
                   help="also write OUT/overlays/<path>__<class>__<method>.png (the 5 best classes of each image)")
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary (errors are still shown)")
    p.set_defaults(run=run)


def _read_list(path: str) -> list[str]:
    """The image paths of a ``--list`` file (UTF-8 text): one a line, ``#`` comments and blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except UnicodeDecodeError:
        raise UsageError(f"--list {path!r} is not a UTF-8 text file of paths") from None
    except OSError as e:
        raise UsageError(f"--list {path!r} cannot be read ({e.strerror or type(e).__name__})") from None


def run(args: argparse.Namespace) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    # --- checks that need no model
    classes, top_k = classes_from_args(args)
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if not os.path.isdir(args.dir):
        raise UsageError(f"images folder {args.dir!r} is not a directory")
    images = _read_list(args.list) if args.list else args.dir
    out = check_out(args.out)
    device = parse_device(args.device)  # cuda: this rank's cuda:LOCAL_RANK
    weights = weights_from_args(args)
    # --- the model, and one blank image through each method; still nothing written
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, cfg = load_from_args(weights, device)
    methods = methods_from_args(args, model)
    if len(methods) != 1:
        raise UsageError(f"--method: explain-dir takes one method, got {args.method!r}")
    # one split and one blank-image check for the whole run: explain_dataset takes the job as it is
    options = method_options(args, methods)
    targets = targets_from_args(model, methods, layers(args.layer))
    n = check_fit(targets, cfg, classes=None if classes == "all" else classes, top_k=top_k, options=options)
    job = DatasetJob(methods[0], targets[methods[0]], list(range(n)) if classes == "all" else classes,
                     top_k if classes is None else None, args.chunk_size, args.max_memory, options[methods[0]],
                     layers(args.layer), n)
    note = weights_note(weights)
    if note and rank0:
        print(f"funcam: warning: {note}", file=sys.stderr)

    def on_error(path: str, reason: str) -> None:
        print(f"funcam: error: {printable(path)}: {reason}", file=sys.stderr, flush=True)

    try:
        summary = explain_dataset(
            images, args.out, model, cfg, job=job, root=args.dir, batch_size=args.batch_size,
            num_workers=args.workers, shard_size=args.shard_size, format=args.format, overlays=args.overlays,
            progress=not args.quiet,
            model_name=weights.name + (" (random weights)" if note else ""), on_error=on_error)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # a full disk, a folder that turned read-only, ...
        raise cannot_write(e, out) from None
    if not rank0:
        return 0  # rank 0 reports for the whole dataset
    errors = os.path.join(args.out, "errors.jsonl")
    if summary.errors and summary.errors == summary.images:
        raise UsageError(f"none of the {summary.images} images could be read (each is named above and in {errors})")
    if not args.quiet:
        print(f"{summary.images} images, {summary.errors} unreadable (see {errors}); "
              f"{summary.written} shards written, {summary.skipped} already done; {summary.seconds:.2f} s",
              file=sys.stderr)
    return 1 if summary.errors else 0
