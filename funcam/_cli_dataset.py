"""``funcam explain-dir DIR --out OUT``: the command line of ``funcam.dataset.explain_dataset``.

Single process:   funcam explain-dir photos/ --out cams/ --top-k 5 --workers 4
Several:          torchrun --nproc-per-node 4 -m funcam.cli explain-dir photos/ --out cams/ --top-k 5
(``python -m funcam._cli_dataset`` takes the same arguments without the subcommand.)
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_class_list(text: str) -> list[int]:
    """``"3,7,10-12"`` -> ``[3, 7, 10, 11, 12]``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--classes must be integers or ranges like 3,7,10-12, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"--classes must name at least one class, got {text!r}")
    return out


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Fill the ``explain-dir`` (sub)parser."""
    p.add_argument("dir", help="folder of images (walked recursively); with --list, the root of the listed paths")
    p.add_argument("--out", required=True, help="output folder (shards, manifest.jsonl, errors.jsonl); resumable")
    p.add_argument("--list", metavar="FILE", help="text file of image paths relative to DIR, one a line")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--classes", type=parse_class_list, help="class indices for every image, e.g. 3,7,10-12")
    which.add_argument("--top-k", type=_positive, help="the K highest-scoring classes of each image (default 1)")
    which.add_argument("--all-classes", action="store_true", help="every class of the model (K = N)")
    p.add_argument("--method", help="any funcam method (default: gradcam for CNNs, chefer for ViTs)")
    p.add_argument("--model", help="efficientnet_lite0 (default, ImageNet weights offline) or any timm name")
    p.add_argument("--checkpoint", metavar="FILE", help="local state dict for --model")
    p.add_argument("--num-classes", type=_positive,
                   help="classes of the checkpoint (default: read from its classifier weight)")
    p.add_argument("--layer", help="layer to cut at for CAM methods (default: the last feature map)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: decode in-process)")
    p.add_argument("--shard-size", type=_positive, default=256, help="images per shard file")
    p.add_argument("--chunk-size", type=_positive, help="classes per vmapped chunk (bounds memory for large K)")
    p.add_argument("--format", choices=("safetensors", "npz"), default="safetensors")
    p.add_argument("--overlays", action="store_true", help="also write OUT/overlays/<path>.png")
    p.add_argument("--device", default=None, help="cpu, cuda (each torchrun rank takes cuda:LOCAL_RANK), cuda:1")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _checkpoint_classes(name: str, checkpoint: str) -> int | None:
    """The number of classes in ``checkpoint``'s classifier weight, found by timm's classifier name."""
    import timm
    import torch

    from funcam.models import _WHEELS

    cfg = timm.get_pretrained_cfg(_WHEELS[name][0] if name in _WHEELS else name, allow_unregistered=True)
    heads = getattr(cfg, "classifier", None) if cfg is not None else None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_model reports the real problem with a clear message
        return None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    for head in (heads if isinstance(heads, (tuple, list)) else [heads or "head"]):
        w = state.get(f"{head}.weight")
        if w is not None and getattr(w, "ndim", 0) >= 1:
            return int(w.shape[0])
    return None


def _read_list(path: str) -> list[str]:
    """The image paths of a ``--list`` file: one a line, ``#`` comments and blank lines skipped."""
    from funcam.dataset import DatasetError

    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except UnicodeDecodeError:
        raise DatasetError(f"--list {path!r} is not a UTF-8 text file of paths") from None
    except OSError as e:
        raise DatasetError(f"--list {path!r} cannot be read ({e.strerror or type(e).__name__})") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from funcam.dataset import DatasetError, explain_dataset
    from funcam.models import DEFAULT_MODEL, ModelError, load_model

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        name = args.model or DEFAULT_MODEL
        n = args.num_classes
        if args.checkpoint and n is None:
            n = _checkpoint_classes(name, args.checkpoint)
        model, cfg = load_model(name, checkpoint=args.checkpoint, num_classes=n)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = model.to(device)
        images = args.dir
        if args.list:
            images = _read_list(args.list)
        summary = explain_dataset(
            images, args.out, model, cfg, root=args.dir, method=args.method,
            classes="all" if args.all_classes else args.classes, top_k=args.top_k, layer=args.layer,
            batch_size=args.batch_size, num_workers=args.workers, shard_size=args.shard_size, format=args.format,
            overlays=args.overlays, chunk_size=args.chunk_size, progress=not args.quiet, model_name=name)
    except (DatasetError, ModelError, ValueError, OSError) as e:
        if rank0:
            print(f"funcam: error: {e}", file=sys.stderr)
        return 2
    if rank0 and not args.quiet:
        print(f"{summary.images} images, {summary.errors} unreadable (see {os.path.join(args.out, 'errors.jsonl')}); "
              f"{summary.written} shards written, {summary.skipped} already done; {summary.seconds:.2f} s",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="funcam explain-dir", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
