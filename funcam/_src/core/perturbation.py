"""Score-CAM and its smoothed variants: channel weights from the model's scores on masked inputs.

Score-CAM (Wang et al. 2020, eq. 4-7): each channel of the feature map, upsampled to the input and min-max scaled,
masks the input, ``M_c = s(U(A_c)) * x``; the weight of channel c for class k is the softmax over channels of the
class's score on the masked inputs, ``w_kc = softmax_c(Y_k(M_c))``; the map is ``sum_c w_kc A_c``.

The masked inputs do not depend on the class: one set of C masked forwards gives every class's scores, so K classes
cost what one does (the peers run the C forwards once per class). The forwards run ``max_memory`` at a time
(``MASKED_BYTES_PER_INPUT_BYTE``), without gradients: as in both peers, the weights are constants, and the maps are
differentiable through ``A`` only (C forwards' graphs would not fit in memory).

Masks. ``scorecam`` is pytorch-grad-cam's ``ScoreCAM``: upsampled first (bilinear, ``align_corners=True``), then
scaled per channel, ``(U - min U) / (max U - min U + 1e-8)``. ``sscam`` / ``iscam`` are torchcam's ``SSCAM`` /
``ISCAM``: scaled at feature resolution, then upsampled (bilinear, ``align_corners=False``), as torchcam's
``ScoreCAM`` (which ``iscam`` with ``num_samples=1`` and ``sscam`` with ``std=0`` equal). The baseline torchcam
subtracts (the score of x itself) shifts every channel's score alike, which a softmax over channels ignores.

* SS-CAM (Wang et al. 2020b, eq. 6; torchcam's definition): ``N`` noisy mask sets ``(s(U(A_c)) + delta) * x``,
  ``delta ~ N(0, std^2)`` per pixel, channel and image; the scores averaged over the N sets.
* IS-CAM (Naidu et al. 2020, eq. 4; torchcam's definition): ``N`` mask sets ``a_i s(U(A_c)) * x`` with the
  cumulative coefficients ``a_i = sum_{j <= i} j / N``; the scores averaged.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from funcam._src.base import CAM, Split
from funcam._src.core.atcut import AtCut, at_cut, grouped_scores
from funcam._src.core.projection import weighted_maps
from funcam._src.core.request import (
    Option,
    Request,
    auto_chunk_size,
    flag,
    generator_or_none,
    non_negative_float,
    positive_int,
)
from funcam._src.core.smoothing import AUG_SMOOTH, EIGEN_SMOOTH, RELU, yes_no

# Bytes one masked input holds in a forward without gradients, per byte of the input: the few activations alive at
# once (a ResNet's largest, after its stem, is 5x the input at 224 px; 16 leaves room for wider stems).
MASKED_BYTES_PER_INPUT_BYTE = 16
SCALE_EPS = 1e-8  # both peers' eps of the per-channel min-max scaling

PROGRESS = Option("progress", False, flag("progress"), "a progress bar over the masked forwards (on stderr)",
                  lambda text: yes_no("progress", text))
NUM_SAMPLES_HELP = "mask sets averaged: sscam's noisy sets (default 35), iscam's integration steps (default 10)"
SCORE_OPTIONS = (RELU, AUG_SMOOTH, EIGEN_SMOOTH, PROGRESS)
SSCAM_OPTIONS = SCORE_OPTIONS + (
    Option("num_samples", 35, positive_int("num_samples"), NUM_SAMPLES_HELP, int),
    Option("std", 2.0, non_negative_float("std"), "standard deviation of the masks' Gaussian noise", float),
    Option("generator", None, generator_or_none("generator"), "the noise's torch.Generator (None: torch's global)"),
)
ISCAM_OPTIONS = SCORE_OPTIONS + (
    Option("num_samples", 10, positive_int("num_samples"), NUM_SAMPLES_HELP, int),
)


def _scaled(t: Tensor) -> Tensor:
    """Per-channel min-max scaling; in float32 for half-precision maps, whose eps would round to 0 (a constant
    channel would be 0 / 0)."""
    work = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    lo = work.amin(dim=(2, 3), keepdim=True)
    return ((work - lo) / (work.amax(dim=(2, 3), keepdim=True) - lo + SCALE_EPS)).to(t.dtype)


def gradcam_masks(a: Tensor, size: tuple[int, int]) -> Tensor:
    """pytorch-grad-cam's masks: ``A (B, C, h, w)`` upsampled (``align_corners=True``), then scaled; (B, C, H, W)."""
    return _scaled(F.interpolate(a, size=size, mode="bilinear", align_corners=True))


def torchcam_masks(a: Tensor, size: tuple[int, int]) -> Tensor:
    """torchcam's masks: ``A`` scaled at feature resolution, then upsampled (``align_corners=False``)."""
    return F.interpolate(_scaled(a), size=size, mode="bilinear", align_corners=False)


def masked_scores(split: Split, x: Tensor, masks: Tensor, cut: AtCut, req: Request, bar: tqdm) -> Tensor:
    """The explained scores of the model on every masked input ``masks[b, c] * x[b]``: ``(B, C, K)``, channels in
    batches of ``max_memory`` (B images per channel, channel-major, so a score callable sees B images at a time)."""
    b, c = masks.shape[:2]
    per_channel = b * x[0].numel() * x.element_size() * MASKED_BYTES_PER_INPUT_BYTE
    step = auto_chunk_size(per_channel, c, req.max_memory) or c
    parts = []
    with torch.no_grad():
        for m in masks.split(step, dim=1):
            n = m.shape[1]
            xs = (m.transpose(0, 1).unsqueeze(2) * x).flatten(0, 1)  # (n B, C_in, H, W): row i B + b
            parts.append(grouped_scores(split.head(split.extract(xs)), cut.idx, req, n))
            bar.update(n)
    return torch.cat(parts, dim=0).permute(1, 0, 2)


def _score_cam(split: Split, x: Tensor, req: Request, name: str, masks: Callable[[Tensor, tuple], Tensor],
               sets: Callable[[Tensor], Iterator[Tensor]], n_sets: int) -> CAM:
    """Maps ``sum_c softmax_c(mean over the mask sets of Y_k(M_c)) A_c`` (B, K, h, w) (module docstring); ``sets``
    turns the base masks into the mask sets, ``n_sets`` of them."""
    cut = at_cut(split, x, req, name)
    a = cut.a.detach()
    base = masks(a, tuple(x.shape[-2:]))
    c = a.shape[1]
    with tqdm(total=c * n_sets, unit="mask", desc=name, file=sys.stderr, leave=False,
              disable=not req.options["progress"]) as bar:
        total = sum(masked_scores(split, x, m, cut, req, bar) for m in sets(base))
    w = torch.softmax(total / n_sets, dim=1).transpose(1, 2)  # (B, K, C): the softmax over channels (eq. 7)
    return CAM(weighted_maps(w, cut.a, req), cut.picked, cut.logits)


def score_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """Score-CAM as pytorch-grad-cam's ``ScoreCAM``: maps ``(B, K, h, w)`` from one set of C masked forwards."""
    return _score_cam(split, x, req, "scorecam", gradcam_masks, lambda m: iter((m,)), 1)


def ss_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """SS-CAM as torchcam's ``SSCAM``: ``num_samples`` noisy mask sets (noise drawn from ``generator``, one
    ``(B, C, H, W)`` draw per set, in torchcam's order)."""
    o = req.options

    def sets(m: Tensor) -> Iterator[Tensor]:
        for _ in range(o["num_samples"]):
            yield m + o["std"] * torch.randn(m.shape, generator=o["generator"], dtype=m.dtype, device=m.device)

    return _score_cam(split, x, req, "sscam", torchcam_masks, sets, o["num_samples"])


def is_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """IS-CAM as torchcam's ``ISCAM``: ``num_samples`` mask sets scaled by the cumulative coefficients."""
    n = req.options["num_samples"]

    def sets(m: Tensor) -> Iterator[Tensor]:
        coeff = 0.0
        for i in range(1, n + 1):
            coeff += i / n
            yield coeff * m

    return _score_cam(split, x, req, "iscam", torchcam_masks, sets, n)
