"""torchvision detectors (Faster / Mask R-CNN, RetinaNet, FCOS, SSD, SSDlite) in eval mode as splits.

``extract(x (B, 3, H, W))`` runs the model's own transform and backbone: the maps are the feature levels the
detection head reads (FPN levels ``'0'..'3'`` for the R-CNNs, every backbone output for the dense heads), one map per
level, ``(B, C, h_l, w_l)``; ``head(features)`` returns the model's detections, a list of B dicts with ``boxes``
(in input pixels), ``labels`` and ``scores``, for ``funcam.targets.boxes``. One map per level rather than one fused
cut: a box is pooled from one FPN level (R-CNN) or scored at one level's anchors (dense heads), so its gradient lives
on that level only; ``funcam.fuse(maps, size=x.shape[-2:])`` gives one map per box.

What is held constant (selection, no gradient, as in the models themselves): the RPN's proposals (torchvision
detaches them), the anchors, and the post-processing's choices (score threshold, NMS, top-k).

* Dense heads: the head is the model's own ``head`` and ``postprocess_detections`` on the levels. Levels that the
  backbone computes from other levels (an FPN's P6 / P7 from P5, SSD's extra levels) are recomputed in the head from
  the level they come from, so that level's gradient is the total derivative, as a hook on the levels gives.
* R-CNNs: the detections are chosen once in ``extract`` (the model's box head on every proposal, then its
  post-processing with the index of each survivor tracked), and the head recomputes only the chosen (proposal, class)
  pairs: RoIAlign of their proposals, the box head, the class's softmax score and decoded box. Their values equal the
  model's (the box head is row-wise in eval mode); the backward then touches at most ``detections_per_img`` rows per
  image instead of every proposal. RoIAlign is funcam's own pure-PyTorch one (``roi_align``): torchvision's C++
  ``roi_align`` is an ``autograd.Function`` that ``torch.func`` cannot differentiate.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcam._src.base import Features, Split

_DENSE = ("RetinaNet", "FCOS", "SSD")


def _is(model: nn.Module, name: str) -> bool:
    """Whether the model is an instance of torchvision's detection class ``name`` (by its classes' names: funcam does
    not import torchvision, an optional dependency that takes seconds to import)."""
    return any(c.__name__ == name and c.__module__.startswith("torchvision.models.detection")
               for c in type(model).__mro__)


def _box_ops() -> Any:
    """torchvision's box operations, imported when a torchvision detector is split (torchvision is loaded by then)."""
    return importlib.import_module("torchvision.ops.boxes")


def applies(model: nn.Module) -> bool:
    """Whether ``split`` takes this model: a torchvision R-CNN with a multi-scale RoIAlign box pool of fixed sampling,
    or a torchvision RetinaNet, FCOS, SSD or SSDlite."""
    if _is(model, "GeneralizedRCNN"):
        pool = getattr(model.roi_heads, "box_roi_pool", None)
        return type(pool).__name__ == "MultiScaleRoIAlign" and pool.sampling_ratio > 0
    return any(_is(model, n) for n in _DENSE)


def split(model: nn.Module) -> Split:
    """``Split(extract, head)`` of a torchvision detector (module docstring): x (B, 3, H, W) -> Features(maps =
    per-level maps) -> list of B detection dicts. ValueError for a model ``applies`` refuses."""
    if not applies(model):
        raise ValueError(f"detection split: {type(model).__name__} is not a torchvision Faster/Mask R-CNN, RetinaNet, "
                         f"FCOS, SSD or SSDlite (or its box pool is not a MultiScaleRoIAlign with a fixed sampling "
                         f"ratio)")
    if _is(model, "GeneralizedRCNN"):
        extract, head, layers = _rcnn_parts(model)
    else:
        extract, head, layers = _dense_parts(model)
    return Split(extract, head, 3, layers, module=model)


def _images(model: nn.Module, x: Tensor) -> tuple[Any, list]:
    """The model's own transform of the B images of x: (ImageList, their original sizes)."""
    images = list(x.unbind(0))
    il, _ = model.transform(images)
    return il, [tuple(img.shape[-2:]) for img in images]


def _levels(feats: Any) -> tuple[list[str], list[Tensor]]:
    if isinstance(feats, Tensor):
        return ["0"], [feats]
    return list(feats.keys()), list(feats.values())


# --- dense heads: RetinaNet, FCOS, SSD ---------------------------------------------------------------------------

def _dense_parts(model: nn.Module) -> tuple[Callable, Callable, tuple[str, ...]]:
    ssd = _is(model, "SSD")
    with torch.no_grad():
        names = _level_names(model)

    def extract(x: Tensor) -> Features:
        """x (B, 3, H, W) -> Features(maps = the backbone's levels, context = (image sizes, original sizes,
        anchors per image))."""
        il, orig = _images(model, x)
        _, maps = _levels(model.backbone(il.tensors))
        anchors = [a.detach() for a in model.anchor_generator(il, maps)]
        return Features(tuple(maps), (il.image_sizes, orig, anchors))

    chains = _chains(model, len(names))

    def head(feats: Features) -> list:
        """Features -> the model's detections, by its own head and post-processing."""
        maps, (sizes, orig, anchors) = list(feats.maps), feats.context
        for k, src, fn in chains:
            # a level the backbone computes from another one is recomputed from it, its own map a zero-valued tap:
            # the gradient at the earlier level is then the total derivative, as a hook on the levels sees it
            maps[k] = fn(maps[src]) + (maps[k] - maps[k].detach())
        out = model.head(maps)
        if ssd:
            dets = model.postprocess_detections(out, anchors, sizes)
        else:
            per_level = [m.shape[2] * m.shape[3] for m in maps]
            a = out["cls_logits"].shape[1] // sum(per_level)  # anchors per position (RetinaNet: 9, FCOS: 1)
            per_level = [n * a for n in per_level]
            split_out = {k: list(v.split(per_level, dim=1)) for k, v in out.items()}
            dets = model.postprocess_detections(split_out, [list(t.split(per_level)) for t in anchors], sizes)
        return model.transform.postprocess(dets, sizes, orig)

    return extract, head, tuple(f"backbone:{n}" for n in names)


def _chains(model: nn.Module, n: int) -> list[tuple[int, int, Callable]]:
    """(level, the level it is computed from, how) for the backbone's levels that are functions of other levels, in
    order: an FPN's P6 / P7 from P5 (``LastLevelP6P7`` fed P5), SSDlite's MobileNet levels each from the one before,
    SSD's VGG extra levels each from the one before (its first extra level reads the unscaled VGG feature, not a
    level)."""
    bb = model.backbone
    extra = getattr(getattr(bb, "fpn", None), "extra_blocks", None)
    if type(extra).__name__ == "LastLevelP6P7" and extra.use_P5 and n >= 3:
        return [(n - 2, n - 3, extra.p6), (n - 1, n - 2, lambda t: extra.p7(F.relu(t)))]
    if type(bb).__name__ == "SSDLiteFeatureExtractorMobileNet":
        blocks = list(bb.features) + list(bb.extra)
        return [(i, i - 1, blocks[i]) for i in range(1, n)]
    if type(bb).__name__ == "SSDFeatureExtractorVGG":
        return [(i, i - 1, bb.extra[i - 1]) for i in range(2, n)]
    return []


def _level_names(model: nn.Module) -> list[str]:
    """The backbone's output names, from a forward on one small blank image."""
    p = next(model.parameters())
    size = getattr(model.transform, "min_size", (64,))
    s = int(size[0] if isinstance(size, (tuple, list)) else size)
    names, _ = _levels(model.backbone(p.new_zeros(1, 3, s, s)))
    return names


# --- R-CNNs: Faster R-CNN, Mask R-CNN ------------------------------------------------------------------------------

def _rcnn_parts(model: nn.Module) -> tuple[Callable, Callable, tuple[str, ...]]:
    rh = model.roi_heads
    pool = rh.box_roi_pool
    with torch.no_grad():  # the levels the pool reads, in the backbone's order (as torchvision filters them)
        names = [n for n in _level_names(model) if n in pool.featmap_names]
    box_ops = _box_ops()

    def extract(x: Tensor) -> Features:
        """x (B, 3, H, W) -> Features(maps = the FPN levels the box pool reads, context = (image sizes, original
        sizes, per image the chosen proposals (M, 4) and their classes (M,)))."""
        il, orig = _images(model, x)
        feats = model.backbone(il.tensors)
        feats = {"0": feats} if isinstance(feats, Tensor) else feats
        with torch.no_grad():
            proposals, _ = model.rpn(il, feats)
            chosen = _choose(model, [feats[n] for n in names], proposals, il.image_sizes)
        return Features(tuple(feats[n] for n in names), (il.image_sizes, orig) + chosen)

    def head(feats: Features) -> list:
        """Features -> the model's detections (boxes, labels, scores), recomputed for the chosen pairs only."""
        maps, (sizes, orig, props, labels) = list(feats.maps), feats.context
        logits, regression = _box_branch(model, maps, props, sizes)
        dets = []
        for i, (lg, rg, p, lab) in enumerate(zip(logits, regression, props, labels)):
            rows = torch.arange(lab.shape[0], device=lab.device)
            scores = F.softmax(lg, -1)[rows, lab]
            codes = rg.unflatten(1, (-1, 4))[rows, lab]  # (M, 4): the class's box regression
            boxes = box_ops.clip_boxes_to_image(rh.box_coder.decode_single(codes, p), sizes[i])
            dets.append({"boxes": boxes, "labels": lab, "scores": scores})
        return model.transform.postprocess(dets, sizes, orig)

    return extract, head, tuple(f"backbone:{n}" for n in names)


def _box_branch(model: nn.Module, maps: list[Tensor], props: list[Tensor], sizes: list) -> tuple[list, list]:
    """Per image, (class logits (M, classes), box regression (M, 4 classes)) of the box head on proposals ``props``."""
    rh = model.roi_heads
    pool = rh.box_roi_pool
    pooled = multiscale_roi_align(maps, props, sizes, tuple(pool.output_size), pool.sampling_ratio,
                                  pool.canonical_scale, pool.canonical_level)
    logits, regression = rh.box_predictor(rh.box_head(pooled))
    counts = [p.shape[0] for p in props]
    return list(logits.split(counts)), list(regression.split(counts))


def _choose(model: nn.Module, maps: list[Tensor], proposals: list[Tensor], sizes: list) -> tuple[list, list]:
    """The model's post-processing (``RoIHeads.postprocess_detections``: background dropped, score threshold, small
    boxes removed, NMS per class, top ``detections_per_img``) with the (proposal, class) of each survivor tracked:
    per image, the survivors' proposals (M, 4) and classes (M,), in the model's order."""
    rh = model.roi_heads
    box_ops = _box_ops()
    logits, regression = _box_branch(model, maps, proposals, sizes)
    props, labels = [], []
    for lg, rg, p, size in zip(logits, regression, proposals, sizes):
        n = lg.shape[-1]
        scores = F.softmax(lg, -1)[:, 1:].reshape(-1)
        boxes = box_ops.clip_boxes_to_image(rh.box_coder.decode(rg, [p]).reshape(-1, n, 4), size)[:, 1:]
        boxes = boxes.reshape(-1, 4)
        idx = torch.arange(scores.shape[0], device=scores.device)
        keep = torch.where(scores > rh.score_thresh)[0]
        keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
        cls = idx[keep] % (n - 1) + 1
        keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], cls, rh.nms_thresh)][:rh.detections_per_img]
        props.append(p[keep // (n - 1)])
        labels.append(keep % (n - 1) + 1)
    return props, labels


def multiscale_roi_align(maps: list[Tensor], boxes: list[Tensor], sizes: list, output_size: tuple[int, int],
                         sampling_ratio: int, canonical_scale: int = 224, canonical_level: int = 4) -> Tensor:
    """torchvision's ``MultiScaleRoIAlign`` as a pure function: maps [(B, C, h_l, w_l)] (the levels, finest first),
    boxes [(M_b, 4)] per image in the transformed image's pixels -> (sum_b M_b, C, *output_size).

    Each box is pooled from level k = floor(k0 + log2(sqrt(area) / 224) + 1e-6), clamped to the levels (Lin et al.
    2017, FPN, eq. 1); a level's scale is 2^round(log2(its size / the largest image size)), as torchvision infers it.
    """
    h = max(s[0] for s in sizes)  # torchvision infers each scale from the heights (in float32, as here)
    scales = [2.0 ** round(float(torch.tensor(m.shape[-2] / h).log2())) for m in maps]
    k_min, k_max = int(-torch.tensor(scales[0]).log2()), int(-torch.tensor(scales[-1]).log2())
    out = []
    for b, bx in enumerate(boxes):
        area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
        lvl = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_scale) + 1e-6)
        lvl = (lvl.clamp(k_min, k_max) - k_min).long()
        res = bx.new_zeros((bx.shape[0], maps[0].shape[1]) + tuple(output_size))
        for k, (m, s) in enumerate(zip(maps, scales)):
            at = torch.where(lvl == k)[0]
            res = res.index_put((at,), roi_align(m[b], bx[at], output_size, s, sampling_ratio))
        out.append(res)
    return torch.cat(out) if len(out) > 1 else out[0]


def roi_align(feature: Tensor, boxes: Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool = False) -> Tensor:
    """RoIAlign (He et al. 2017, Mask R-CNN, sec. 3) of one image: feature (C, H, W), boxes (M, 4) (x1, y1, x2, y2)
    in image pixels -> (M, C, PH, PW), with torchvision's kernel's conventions: ``sampling_ratio`` x
    ``sampling_ratio`` bilinear samples per bin, averaged; a box at least 1 x 1 when not ``aligned``; samples beyond
    one pixel outside the map are 0, those within it read the border.

    Bilinear sampling is ``F.grid_sample`` (border padding, the sample's pixel coordinate p at normalised
    (2 p + 1) / size - 1), so the backward is its scatter into the map, which ``torch.func`` differentiates.
    """
    ph, pw = output_size
    sr = sampling_ratio
    c, hh, ww = feature.shape
    off = 0.5 if aligned else 0.0
    start = boxes * spatial_scale - off  # (M, 4)
    size = start[:, 2:] - start[:, :2]
    size = size if aligned else size.clamp(min=1.0)
    bins = size / boxes.new_tensor([pw, ph])  # (M, 2): bin width, height
    steps = (torch.arange(pw * sr, device=boxes.device, dtype=boxes.dtype) + 0.5) / sr  # sample k of a row, in bins
    xs = start[:, :1] + steps[None] * bins[:, :1]  # (M, PW sr)
    steps = (torch.arange(ph * sr, device=boxes.device, dtype=boxes.dtype) + 0.5) / sr
    ys = start[:, 1:2] + steps[None] * bins[:, 1:2]  # (M, PH sr)
    m = boxes.shape[0]
    gx = ((2 * xs + 1) / ww - 1)[:, None, :].expand(m, ph * sr, pw * sr)
    gy = ((2 * ys + 1) / hh - 1)[:, :, None].expand(m, ph * sr, pw * sr)
    grid = torch.stack([gx, gy], dim=-1).reshape(1, m * ph * sr, pw * sr, 2).to(feature.dtype)
    val = F.grid_sample(feature[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (((ys >= -1) & (ys <= hh))[:, :, None] & ((xs >= -1) & (xs <= ww))[:, None, :]).to(feature.dtype)
    val = val.reshape(c, m, ph * sr, pw * sr) * inside
    return val.reshape(c, m, ph, sr, pw, sr).mean(dim=(3, 5)).permute(1, 0, 2, 3)
