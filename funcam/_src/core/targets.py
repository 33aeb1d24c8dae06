"""Score callables for ``classes=``: what to explain when a model's output is not class logits.

Each function returns ``score(output) -> (B, K)``, a pure function of the model's output, to pass as
``funcam.cam(model_or_split, x, classes=score)``: one forward, one vjp vmapped over the K score columns (or, for
Grad-CAM and many columns, forward-mode passes over the feature grid), where a per-target loop pays K backward passes.

* ``prompts``: CLIP-style zero-shot, K text embeddings: the cosine similarity of the image embedding with each.
* ``boxes``: detection, N reference boxes per image, one score per box by pytorch-grad-cam's
  ``FasterRCNNBoxScoreTarget`` rule (``box_matches`` says which boxes found a detection).
* ``region``: segmentation, the logits of class c summed inside a mask.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["UnmatchedBoxWarning", "box_matches", "boxes", "prompts", "region"]


class UnmatchedBoxWarning(UserWarning):
    """A reference box matched no detection: its score is 0 and its map exactly zero."""


# --- prompts -------------------------------------------------------------------------------------------------------

def prompts(text_embeddings: Tensor, *, logit_scale: float | Tensor | None = None) -> Callable[[Any], Tensor]:
    """K text prompts as K "classes" of a CLIP-style image tower: ``score(output) -> (B, K)``.

    text_embeddings: ``(K, D)`` prompt embeddings (``model.encode_text(tokens)``, Hugging Face
        ``get_text_features``), normalised here.
    logit_scale: the multiplier of the similarities, CLIP's ``model.logit_scale.exp()`` (about 100 for trained
        models; Radford et al. 2021, Fig. 3's ``np.exp(t)``), not the stored log parameter; None: plain cosines.

    The score of prompt k for image b is ``logit_scale * <e_b / |e_b|, t_k / |t_k|>`` (Radford et al. 2021, Fig. 3),
    with e_b the image embedding read from the output: a ``(B, D)`` tensor (open_clip's ``encode_image`` / image
    tower, funcam's CLIP splits), a Hugging Face output's ``.image_embeds`` (``CLIPVisionModelWithProjection``,
    ``CLIPModel``), a dict's ``"image_features"`` / ``"image_embeds"``, or a tuple's first element (open_clip's
    ``CLIP(image)``). The prompts are a linear head after the normalised embedding.
    """
    refs = _matrix(text_embeddings, "prompts: text_embeddings", "(K, D) prompt embeddings")
    scale = _scale(logit_scale)
    refs = F.normalize(refs.detach(), dim=-1)

    def score(output: Any) -> Tensor:
        """The model's output -> (B, K) scaled cosine similarities."""
        emb = image_embedding(output)
        if emb.shape[-1] != refs.shape[1]:
            raise ValueError(f"prompts: the image embedding has D = {emb.shape[-1]} but text_embeddings has "
                             f"D = {refs.shape[1]}; embed the prompts with the same CLIP model")
        sims = F.normalize(emb, dim=-1) @ refs.to(dtype=emb.dtype, device=emb.device).T
        return sims if scale is None else sims * scale

    return score


def image_embedding(output: Any) -> Tensor:
    """The ``(B, D)`` image embedding in a CLIP model's output (see ``prompts``)."""
    if isinstance(output, dict):
        found = next((output[k] for k in ("image_embeds", "image_features") if k in output), None)
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    else:
        found = getattr(output, "image_embeds", output)
    if isinstance(found, Tensor) and found.ndim == 2 and found.is_floating_point():
        return found
    what = f"shape {tuple(found.shape)}" if isinstance(found, Tensor) else type(found).__name__
    raise TypeError(f"prompts: the model's output must hold a (B, D) image embedding (a tensor, .image_embeds, "
                    f"output['image_features'] or a tuple's first element), got {what} from a "
                    f"{type(output).__name__}")


def _scale(logit_scale: Any) -> Tensor | float | None:
    if logit_scale is None:
        return None
    if isinstance(logit_scale, Tensor) and logit_scale.numel() == 1 and logit_scale.is_floating_point():
        value = float(logit_scale.detach())
        logit_scale = logit_scale.detach().reshape(())
    elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        value = float(logit_scale)
    else:
        raise TypeError(f"prompts: logit_scale must be None, a number or a one-element floating tensor "
                        f"(model.logit_scale.exp()), got {logit_scale!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"prompts: logit_scale must be a positive finite multiplier (model.logit_scale.exp(), "
                         f"not the stored log parameter), got {value}")
    return logit_scale


# --- regions -------------------------------------------------------------------------------------------------------

def region(mask: Tensor | None, classes: int | Sequence[int] | Tensor) -> Callable[[Any], Tensor]:
    """Segmentation: class c's logits summed inside a mask, one score per (mask, class): ``score(output) -> (B, K)``.

    mask: bool or float weights at the resolution of the model's logits: ``(H, W)`` (every class), ``(K, H, W)``
        (one per class) or ``(B, K, H, W)`` (per image); None: the pixels the model predicts as c (the argmax over
        classes), pytorch-grad-cam's ``SemanticSegmentationTarget`` with its mask taken from the prediction.
    classes: an int or K ints, the channels of the logits.

    The logits are read from the output: a ``(B, N, H, W)`` tensor, a dict's ``"out"`` (torchvision segmentation)
    or ``.logits`` (Hugging Face). Score k of image b is ``sum_hw logits[b, c_k] * mask[b, k]``.
    """
    ks = _class_list(classes)
    idx = torch.tensor(ks, dtype=torch.long)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.ndim not in (2, 3, 4) or mask.is_complex():
            got = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"region: mask must be None or a tensor (H, W), (K, H, W) or (B, K, H, W), got {got}")
        if mask.ndim >= 3 and mask.shape[-3] not in (1, len(ks)):
            raise ValueError(f"region: mask has {mask.shape[-3]} masks (shape {tuple(mask.shape)}) for "
                             f"{len(ks)} classes; give one mask per class, or one (H, W) mask for all")
        mask = mask.detach()

    def score(output: Any) -> Tensor:
        """The model's output -> (B, K) logits summed inside each mask."""
        logits = segmentation_logits(output)
        b, n, h, w = logits.shape
        if max(ks) >= n:
            raise ValueError(f"region: classes must lie in [0, {n}) (the logits have {n} channels), got {max(ks)}")
        sel = logits[:, idx.to(logits.device)]  # (B, K, H, W)
        if mask is None:
            inside = logits.argmax(dim=1, keepdim=True) == idx.to(logits.device).view(1, -1, 1, 1)
        else:
            if tuple(mask.shape[-2:]) != (h, w) or (mask.ndim == 4 and mask.shape[0] != b):
                raise ValueError(f"region: mask has shape {tuple(mask.shape)} but the logits are {(b, n, h, w)}; "
                                 f"resize it to their resolution (F.interpolate(mask.float(), size=({h}, {w})))")
            inside = mask.to(device=logits.device)
            inside = inside.view((1, 1) + tuple(inside.shape)) if inside.ndim == 2 else inside
        return (sel * inside.to(sel.dtype)).sum(dim=(2, 3))

    return score


def segmentation_logits(output: Any) -> Tensor:
    """The ``(B, N, H, W)`` logits of a segmentation output (see ``region``)."""
    found = output.get("out") if isinstance(output, dict) else getattr(output, "logits", output)
    if isinstance(found, Tensor) and found.ndim == 4 and found.is_floating_point():
        return found
    what = f"shape {tuple(found.shape)}" if isinstance(found, Tensor) else type(found).__name__
    raise TypeError(f"region: the model's output must hold (B, N, H, W) logits (a tensor, output['out'] or "
                    f".logits), got {what} from a {type(output).__name__}")


# --- boxes ---------------------------------------------------------------------------------------------------------

def boxes(boxes: Tensor, labels: Tensor | Sequence[int], *, iou: float = 0.5) -> Callable[[Any], Tensor]:
    """Detection: one score per reference box, ``score(detections) -> (B, N)``.

    boxes: ``(N, 4)`` (every image) or ``(B, N, 4)`` reference boxes, ``(x1, y1, x2, y2)`` in the detections'
        coordinates (input pixels for torchvision and funcam's detection splits).
    labels: ``(N,)`` or ``(B, N)`` their class labels (images with fewer boxes: pad with label -1, which matches
        nothing).
    iou: the overlap a detection needs, strictly exceeded.

    The detections are a list of B dicts with ``"boxes" (M, 4)``, ``"labels" (M,)`` and ``"scores" (M,)`` (a
    torchvision detector in eval mode, funcam's detection splits). Per reference box, pytorch-grad-cam's
    ``FasterRCNNBoxScoreTarget`` rule: the detection with the largest IoU with it, whatever its label (the first
    of equals), matches when that IoU is > ``iou`` and its label is the reference label; the score is that IoU plus
    the detection's score (the IoU term carries the gradient through the box regression, except for a
    reference equal to its detection up to roundoff: the IoU's peak, where it has none). A box without a match
    (or whose best overlap has another label) scores 0, so its map is exactly zero: ``UnmatchedBoxWarning`` says
    so, and ``box_matches`` gives the (B, N) mask. One score per box, where pytorch-grad-cam sums them into one.
    """
    ref, lab = _reference(boxes, labels, iou)

    def score(output: Any) -> Tensor:
        """B images' detections -> (B, N) box scores."""
        dets = detections(output)
        ious, idx, ok = _match(dets, ref, lab, iou)
        rows = []
        for d, best, i, m in zip(dets, ious, idx, ok):
            if d["boxes"].shape[0] == 0:
                rows.append(d["boxes"].new_zeros(m.shape))
                continue
            rows.append(torch.where(m, best + d["scores"][i], best.new_zeros(())))
        out = torch.stack(rows)
        if not torch.compiler.is_compiling():
            unmatched = ~torch.stack(ok)
            if bool(unmatched.any()):
                where = unmatched.nonzero().tolist()
                warnings.warn(f"boxes: {len(where)} of {unmatched.numel()} reference boxes match no detection "
                              f"(IoU > {iou} with the same label; (image, box) {where[:8]}): their scores are 0 "
                              f"and their maps exactly zero", UnmatchedBoxWarning, stacklevel=2)
        return out

    return score


def box_matches(output: Any, boxes: Tensor, labels: Tensor | Sequence[int], *, iou: float = 0.5) -> Tensor:
    """``(B, N)`` bool: which reference boxes ``boxes`` (with ``labels``) match a detection of ``output`` by the
    rule of ``funcam.targets.boxes`` (the rest have zero scores and exactly zero maps)."""
    ref, lab = _reference(boxes, labels, iou)
    return torch.stack(_match(detections(output), ref, lab, iou)[2])


def detections(output: Any) -> list:
    """The list of B per-image detection dicts (``boxes``, ``labels``, ``scores``) in a detector's output."""
    ok = isinstance(output, (list, tuple)) and all(
        isinstance(d, dict) and all(isinstance(d.get(k), Tensor) for k in ("boxes", "labels", "scores"))
        for d in output)
    if not ok:
        raise TypeError(f"boxes: the model's output must be a list of per-image dicts with 'boxes', 'labels' and "
                        f"'scores' (a torchvision detector in eval mode, funcam's detection splits), got a "
                        f"{type(output).__name__}")
    return list(output)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """a (N, 4), b (M, 4) boxes (x1, y1, x2, y2) -> (N, M) intersection over union (Jaccard index); 0 for two
    empty boxes (a clipped detection can be one), whose 0 / 0 would put NaN in every gradient through
    ``torch.where``."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def _match(dets: list, ref: Tensor, lab: Tensor, iou: float) -> tuple[list, list, list]:
    """Per image: the best IoU (N,) of each reference box, the index (N,) of that detection, and whether it matches."""
    if ref.ndim == 3 and ref.shape[0] != len(dets):
        raise ValueError(f"boxes: boxes has shape {tuple(ref.shape)} for {len(dets)} images")
    ious, idx, ok = [], [], []
    for b, d in enumerate(dets):
        r = (ref[b] if ref.ndim == 3 else ref).to(dtype=d["boxes"].dtype, device=d["boxes"].device)
        lb = (lab[b] if lab.ndim == 2 else lab).to(d["labels"].device)
        if d["boxes"].shape[0] == 0:
            ious.append(r.new_zeros(r.shape[0]))
            idx.append(lb.new_zeros(r.shape[0]))
            ok.append(torch.zeros(r.shape[0], dtype=torch.bool, device=r.device))
            continue
        all_ious = box_iou(r, d["boxes"])  # (N, M)
        i = all_ious.detach().argmax(dim=1)  # the selection: no gradient, the first of equals
        best = all_ious.gather(1, i[:, None])[:, 0]
        ious.append(_held_at_peak(best, r, d["boxes"][i]))
        idx.append(i)
        ok.append((best.detach() > iou) & (d["labels"][i] == lb))
    return ious, idx, ok


def _held_at_peak(best: Tensor, ref: Tensor, det: Tensor) -> Tensor:
    """best (N,) IoUs of references ref (N, 4) with their detections det (N, 4), with no gradient where a detection
    equals its reference up to roundoff (every coordinate within sqrt(eps) of the box's largest one).

    There the IoU is at its peak (1), a corner with no derivative: torch's rule for equal operands of ``maximum`` /
    ``minimum`` (half the gradient to each) gives 0 for bitwise-equal boxes, which is what pytorch-grad-cam gets on a
    model's own detections; a detection recomputed by a split (another RoIAlign, another batch) differs from the
    model's by roundoff, and would get a one-sided derivative (about 1 / the box's side, of the roundoff's sign)
    that outweighs the score's. The value is unchanged."""
    tol = torch.finfo(ref.dtype).eps ** 0.5 * ref.abs().amax(-1).clamp(min=1.0)
    near = (det.detach() - ref).abs().amax(-1) <= tol
    return torch.where(near, best.detach(), best)


def _reference(boxes: Any, labels: Any, iou: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(boxes, Tensor) or boxes.ndim not in (2, 3) or boxes.shape[-1] != 4 \
            or not boxes.is_floating_point():
        got = f"shape {tuple(boxes.shape)}, dtype {boxes.dtype}" if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes: boxes must be a floating tensor (N, 4) or (B, N, 4) of (x1, y1, x2, y2), got {got}")
    lab = labels if isinstance(labels, Tensor) else torch.as_tensor(list(labels))
    if lab.is_floating_point() or lab.dtype == torch.bool or lab.shape != boxes.shape[:-1]:
        raise ValueError(f"boxes: labels must be integers of shape {tuple(boxes.shape[:-1])} (one per box), got "
                         f"shape {tuple(lab.shape)}, dtype {lab.dtype}")
    if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0 <= iou < 1:
        raise ValueError(f"boxes: iou must be a number in [0, 1), got {iou!r}")
    return boxes.detach(), lab.long()


def _matrix(t: Any, name: str, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim != 2 or not t.is_floating_point() or t.shape[0] == 0:
        got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating tensor {what}, got {got}")
    return t


def _class_list(classes: Any) -> list[int]:
    if isinstance(classes, Tensor):
        if classes.is_floating_point() or classes.dtype == torch.bool or classes.ndim > 1:
            raise ValueError(f"region: classes must be an int or a 1-D integer tensor, got dtype {classes.dtype}, "
                             f"shape {tuple(classes.shape)}")
        classes = classes.reshape(-1).tolist()
    elif isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, (list, tuple)) or not classes or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
        raise ValueError(f"region: classes must be a non-negative int or a non-empty list of them, got {classes!r}")
    return list(classes)
