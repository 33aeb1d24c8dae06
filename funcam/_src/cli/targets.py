"""``--prompts`` and ``--boxes``: the K maps of a CLIP model or a detector (``funcam._src.app.families``).

``--prompts "a cat,a dog"``: one map per text prompt, the prompts embedded by the model's own text tower and
explained by ``funcam.targets.prompts`` (captions: each prompt's zero-shot probability, the softmax of the scaled
cosines over the prompts). ``--boxes "x0,y0,x1,y1[:label];..."``: one map per reference box, in the image's own
pixels, explained by ``funcam.targets.boxes`` (captions: the box's score, the IoU of its detection plus the
detection's score, or "no match": a box that matches no detection has an exactly zero map, said on stderr too); a
box without a label takes the label of the detection that overlaps it most. The same prompts or boxes apply to
every image. Everything that needs no model is checked here before it loads (``check``); ``Task`` is what the run
needs once it has.
"""
from __future__ import annotations

import argparse
import re
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from funcam._src.app.clip_models import Clip
from funcam._src.app.detectors import Detector, detector_input
from funcam._src.app.explain import explain
from funcam._src.app.families import Family
from funcam._src.app.hub import ModelError
from funcam._src.app.images import ImageError, printable, probe_image
from funcam._src.app.models import DEFAULT_MODEL, Preprocess, preprocess
from funcam._src.cli.options import UsageError
from funcam._src.core.targets import UnmatchedBoxWarning, box_iou, box_matches, boxes, prompts
from funcam._src.cuts import clip as clip_cut
from funcam._src.guard import ZeroMapWarning

_NUMBER = r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)\s*"
_BOX = re.compile(rf"({_NUMBER}),({_NUMBER}),({_NUMBER}),({_NUMBER})(?::(.*))?")


class Box(NamedTuple):
    coords: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    label: str | None                           # a class index or name as given, or None: the best overlap's


def add_arguments(g) -> None:
    """--prompts, --boxes."""
    g.add_argument("--prompts", default=None, metavar="TEXT[,TEXT...]",
                   help="CLIP models (--model open_clip:ARCH or hf:FOLDER): one map per text prompt, e.g. "
                        "'a cat,a dog'")
    g.add_argument("--boxes", default=None, metavar="X0,Y0,X1,Y1[:LABEL][;...]",
                   help="detectors (--model torchvision:NAME or yolo:CONFIG): one map per reference box in the "
                        "image's pixels, e.g. '10,20,120,200:1;50,60,90,100:dog' (no label: the best overlap's)")


def parse_prompts(text: str) -> list[str]:
    """``"a cat, a dog"`` -> ``["a cat", "a dog"]``; UsageError for an empty prompt or list."""
    items = [t.strip() for t in text.split(",")]
    if not any(items) or not all(items):
        raise UsageError(f"--prompts: expected comma-separated text prompts like 'a cat,a dog' (none empty), got "
                         f"{printable(text)!r}")
    return items


def parse_boxes(text: str) -> list[Box]:
    """``"10,20,110,220:1;5,5,50,50"`` -> Boxes; UsageError naming the box at fault."""
    out = []
    for i, item in enumerate(text.split(";")):
        m = _BOX.fullmatch(item)
        why = "x0,y0,x1,y1 or x0,y0,x1,y1:label with four numbers"
        if m is not None:
            x0, y0, x1, y1 = (float(m.group(j)) for j in range(1, 5))
            label = m.group(5).strip() if m.group(5) is not None else None
            if x0 < x1 and y0 < y1 and label != "":
                out.append(Box((x0, y0, x1, y1), label))
                continue
            why = "a label after ':'" if label == "" else "x0 < x1 and y0 < y1 (top-left, then bottom-right corner)"
        raise UsageError(f"--boxes: box {i + 1} {printable(item.strip())!r} of {printable(text)!r}: expected {why}")
    return out


def check(args: argparse.Namespace, family: Family | None, images: Sequence[str]) -> list[str] | list[Box] | None:
    """Before the model loads: --prompts / --boxes against the model's family and the other options, and every box
    inside every image (from its header). Returns the prompts, the boxes, or None (a classifier's classes)."""
    given = [o for o in ("prompts", "boxes") if getattr(args, o) is not None]
    if len(given) > 1:
        raise UsageError("--prompts and --boxes are for different models (CLIP, detectors); give one")
    wants = family.targets if family is not None else None
    model = f"--model {args.model}" if args.model else f"the default model {DEFAULT_MODEL}"
    if given and given[0] != wants:
        what = {"prompts": "CLIP models (--model open_clip:ARCH or hf:FOLDER)",
                "boxes": "detectors (--model torchvision:NAME or yolo:CONFIG)"}[given[0]]
        kind = {"prompts": "a CLIP model", "boxes": "a detector", None: "a classifier"}[wants]
        raise UsageError(f"--{given[0]} applies to {what}; {model} is {kind}"
                         + ("; use --classes or --top-k" if wants is None else f"; use --{wants}"))
    if wants is None:
        return None
    if not given:
        example = "--prompts 'a cat,a dog'" if wants == "prompts" else "--boxes '10,20,120,200:1'"
        raise UsageError(f"{model} explains {wants}, not classes: add {example}")
    for opt in ("classes", "top_k", "all_classes", "layer"):
        if getattr(args, opt, None) not in (None, False):
            raise UsageError(f"--{opt.replace('_', '-')} does not apply with --{wants} (one map per "
                             f"{'prompt' if wants == 'prompts' else 'box'})")
    if wants == "prompts" and args.num_classes is not None:
        raise UsageError("--num-classes does not apply to a CLIP model (its prompts are its classes)")
    if wants == "prompts":
        return parse_prompts(args.prompts)
    found = parse_boxes(args.boxes)
    for path in images:
        try:
            w, h = probe_image(path)
        except ImageError:
            continue  # reported with the other inputs
        for i, b in enumerate(found):
            x0, y0, x1, y1 = b.coords
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise UsageError(f"--boxes: box {i + 1} ({','.join(f'{v:g}' for v in b.coords)}) lies outside "
                                 f"{printable(path)} ({w}x{h} pixels): expected 0 <= x0 < x1 <= {w}, "
                                 f"0 <= y0 < y1 <= {h}")
    return found


class Task(NamedTuple):
    """What the run explains instead of classes. ``prepare(images uint8 [(3, H, W)]) -> x``; ``pre``: how ``x`` is
    drawn (``unnormalize``); ``score_for(target, x) -> score callable`` (boxes: labels resolved per image);
    ``columns(output, score, b) -> (grid labels, captions, file tags, matched)`` for image b; ``boxes (K, 4)`` to
    draw on the maps (None for prompts); ``kind``, ``names`` (the prompts or the boxes as given)."""
    kind: str
    names: list[str]
    pre: Preprocess
    prepare: Callable[[list[Tensor]], Tensor]
    score_for: Callable[[Any, Tensor], tuple[Callable, Tensor | None]]
    columns: Callable[[Any, Callable, Any, int], tuple[list[str], list[str], list[str], list[bool]]]
    boxes: Tensor | None


def prompt_task(clip: Clip, texts: list[str], device: torch.device) -> Task:
    """The prompts embedded once by the model's text tower (on ``device``)."""
    embeddings, scale = clip.encode(texts)
    score = prompts(embeddings, logit_scale=scale)

    def columns(output: Any, score: Callable, labels: Any, b: int):
        probs = score(output).detach().float().softmax(-1)[b].cpu().tolist()
        return ([f"{t} {p:.2f}" for t, p in zip(texts, probs)], [f"{t} ({p:.2f})" for t, p in zip(texts, probs)],
                [f"p{k}" for k in range(len(texts))], [True] * len(texts))

    return Task("prompts", texts, clip.pre, lambda images: preprocess(images, clip.pre),
                lambda target, x: (score, None), columns, None)


def _label(text: str | None, categories: list[str] | None) -> int | None:
    if text is None:
        return None
    if re.fullmatch(r"\d+", text):
        return int(text)
    if categories and text in categories:
        return categories.index(text)
    raise UsageError(f"--boxes: label {printable(text)!r} is neither a class index nor one of the model's category "
                     f"names" + (f" ({', '.join(categories[1:6])}, ...)" if categories else " (it has none)"))


def box_task(det: Detector, found: list[Box], device: torch.device) -> Task:
    """The reference boxes with their labels checked against the model (a name is looked up in its categories)."""
    labels = [_label(b.label, det.categories) for b in found]
    ref = torch.tensor([b.coords for b in found], dtype=torch.float32, device=device)
    names = [f"box {i + 1}" for i in range(len(found))]

    def score_for(target: Any, x: Tensor) -> Callable:
        lab = torch.tensor([[-1 if v is None else v for v in labels]] * x.shape[0], device=device)
        if any(v is None for v in labels):  # the label of the detection that overlaps the box most
            with torch.no_grad():
                dets = target.head(target.extract(x))
            for i, d in enumerate(dets):
                if d["boxes"].shape[0]:
                    best = d["labels"][box_iou(ref.to(d["boxes"]), d["boxes"]).argmax(dim=1)]
                    lab[i] = torch.where(lab[i] < 0, best.to(lab), lab[i])
        return boxes(ref.expand(x.shape[0], -1, -1), lab), lab

    def columns(output: Any, score: Callable, labels: Tensor, b: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnmatchedBoxWarning)  # said on stderr by the run, once per image
            values = score(output)[b].detach().float().cpu().tolist()
        ok = box_matches(output, ref.expand(labels.shape[0], -1, -1), labels)[b].cpu().tolist()
        cats = det.categories
        labs = [int(v) for v in labels[b].tolist()]
        what = [f"{n}: {cats[v] if cats and 0 <= v < len(cats) else ('?' if v < 0 else v)}"
                for n, v in zip(names, labs)]
        cols = [f"{w} {s:.2f}" if m else f"{w} no match" for w, s, m in zip(what, values, ok)]
        caps = [f"{w} ({s:.2f})" if m else f"{w} (no match: zero map)" for w, s, m in zip(what, values, ok)]
        return cols, caps, [f"box{k + 1}" for k in range(len(found))], ok

    pre = Preprocess(size=0, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    return Task("boxes", [f"{n} ({','.join(f'{v:g}' for v in b.coords)})" for n, b in zip(names, found)], pre,
                lambda images: detector_input(images, det.stride), score_for, columns, ref.cpu())


def load(family: Family, weights: Any, device: torch.device) -> Clip | Detector:
    """The checked model of ``weights`` (``options.Weights``) built by its family, on ``device``."""
    try:
        loaded = family.load(weights.name, checkpoint=weights.checkpoint, random_weights=weights.random,
                             num_classes=weights.num_classes)
    except ModelError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    loaded.model.to(device)
    return loaded


def make_task(loaded: Clip | Detector, found: list[str] | list[Box], device: torch.device) -> Task:
    return prompt_task(loaded, found, device) if isinstance(loaded, Clip) else box_task(loaded, found, device)


def image_targets(targets: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``targets_from_args``'s targets with the methods of the whole model given a CLIP model's image tower (image ->
    embedding: ``model.visual`` of open_clip, a Hugging Face ``CLIPModel`` whose own forward takes text first as its
    ``get_image_features``); a detector stays as it is."""
    v = clip_cut.tower(model)
    image = clip_cut.ImageFeatures(v) if type(v).__name__ == "CLIPModel" else v
    return {m: image if t is model else t for m, t in targets.items()}


def check_fit(targets: dict[str, Any], task: Task, options: dict[str, dict], device: torch.device) -> None:
    """Each method on its target, one blank input and the task's score: nothing is written; ``UsageError`` names
    the method that does not fit."""
    s = task.pre.size or 64
    x = task.prepare([torch.zeros(3, s, s, dtype=torch.uint8)]).to(device)
    for m, target in targets.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnmatchedBoxWarning)  # a blank image has no detections
                warnings.simplefilter("ignore", ZeroMapWarning)
                explain(target, x, method=m, classes=task.score_for(target, x)[0], **options.get(m, {}))
        except (ValueError, TypeError) as e:
            raise UsageError(f"--method {m}: {str(e).splitlines()[0]}") from None
