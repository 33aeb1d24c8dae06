"""Ablation-CAM (Desai & Ramaswamy 2020, eq. 3-4): channel weights from the drop of each class's score when one
channel of the feature map is zeroed.

``w_kc = (y_k - y_k^c) / y_k`` with ``y_k^c`` the score with channel c of ``A`` set to 0; the map is
``sum_c w_kc A_c`` (ReLU'd). Only the head after the cut is re-run, never the model before it, and every class comes
from the same C ablations, as a ``(B, K, C)`` table:

* a head that starts with global average pooling (``Split.pooled``): zeroing channel c of ``A`` zeroes entry c of
  its mean ``z``, so the ablations are C evaluations of the small pooled head on ``(B, C)`` vectors, batched; with a
  final Linear ``W`` the table is one product, ``y_k - y_k^c = W_k (p(z) - p(z^c))`` (``p``: the head before the
  Linear; for timm's ResNets ``p`` is the identity and the drop is ``W_kc z_c``).
* any other head: C evaluations of the head, vmapped over the C ablations, ``max_memory`` at a time.

pytorch-grad-cam's ``AblationCAM`` deviates from the paper where the layer takes negative values: it zeroes a channel
only when the layer's minimum is exactly 0 (after a ReLU), and otherwise sets it to ``min - 1e7``. funcam keeps the
paper's zero: on a post-ReLU cut (timm CNNs' last stage, ``layer4`` of a ResNet) both agree, and the tests compare
with pytorch-grad-cam there and with a loop over the paper's formula elsewhere.

The weights are computed without gradients (the peer's constants); the maps are differentiable through ``A``. A
score of exactly 0 divides by zero (the paper's formula), which the entry reports as a non-finite map.
"""
from __future__ import annotations

import torch
from torch import Tensor

from funcam._src.base import CAM, Pooled, Split
from funcam._src.core.atcut import AtCut, at_cut, class_scores, grouped_scores
from funcam._src.core.projection import weighted_maps
from funcam._src.core.request import Request, auto_chunk_size
from funcam._src.core.smoothing import AUG_SMOOTH, EIGEN_SMOOTH, RELU

ABLATION_OPTIONS = (RELU, AUG_SMOOTH, EIGEN_SMOOTH)

# Bytes one ablated copy holds in the head, per byte of the feature map: the head's own activations (a ResNet's last
# stage halves the grid and doubles the channels: about the map's size per layer, a few alive at once).
HEAD_BYTES_PER_MAP_BYTE = 8


def _pooled_of(split: Split, cut: AtCut) -> Pooled | None:
    """The split's ``Pooled`` for these features (a graph route's lookup binds their context), as the engine
    reads it."""
    if callable(split.pooled):
        return split.pooled(cut.feats)
    return None if cut.feats.context else split.pooled


def pooled_drops(pooled: Pooled, cut: AtCut, req: Request) -> Tensor:
    """``y_k - y_k^c`` (B, K, C) on a head that starts with global average pooling (module docstring)."""
    a = cut.a
    b, c = a.shape[:2]
    z = a.mean(dim=(2, 3))
    # rows of the C ablated means, channel-major (row c B + b: image b with channel c zeroed)
    zc = (z.unsqueeze(0) * (1 - torch.eye(c, dtype=z.dtype, device=z.device)).unsqueeze(1)).flatten(0, 1)
    clf = pooled.classifier
    if clf is not None and req.score_fn is None:
        p = pooled.pre_logits(torch.cat([z, zc]))
        diff = (p[:b].unsqueeze(0) - p[b:].view(c, b, -1)).permute(1, 2, 0)  # (B, D, C)
        return torch.bmm(clf.weight[cut.idx], diff)  # W_k (p(z) - p(z^c)); the bias cancels
    out = pooled.pre_logits(zc)
    out = clf(out) if clf is not None else out
    return cut.scores.unsqueeze(2) - grouped_scores(out, cut.idx, req, c).permute(1, 2, 0)


def head_drops(split: Split, cut: AtCut, req: Request) -> Tensor:
    """``y_k - y_k^c`` (B, K, C) from C evaluations of the head, vmapped over the channel masks."""
    a = cut.a
    c = a.shape[1]
    keep = 1 - torch.eye(c, dtype=a.dtype, device=a.device)  # (C, C): row c zeroes channel c

    def ablated(k: Tensor) -> Tensor:
        return class_scores(split.head(cut.rebuild((a * k[:, None, None],))), cut.idx, req)

    chunk = auto_chunk_size(HEAD_BYTES_PER_MAP_BYTE * a.numel() * a.element_size(), c, req.max_memory)
    # a head in training mode (dropout; the call warns) draws the same dropout for every ablation
    scores = torch.func.vmap(ablated, chunk_size=chunk, randomness="same")(keep)
    return cut.scores.unsqueeze(2) - scores.permute(1, 2, 0)


def ablation_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """Ablation-CAM: maps ``(B, K, h, w)`` with weights ``(y_k - y_k^c) / y_k`` (module docstring)."""
    cut = at_cut(split, x, req, "ablationcam")
    a = cut.a
    with torch.no_grad():
        fixed = cut._replace(a=a.detach(), scores=cut.scores.detach())
        pooled = _pooled_of(split, fixed)
        drops = pooled_drops(pooled, fixed, req) if pooled is not None else head_drops(split, fixed, req)
        w = drops / fixed.scores.unsqueeze(2)
    return CAM(weighted_maps(w, a, req), cut.picked, cut.logits)
