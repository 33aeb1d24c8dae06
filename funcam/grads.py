"""The one place that calls ``torch.func.vjp`` and ``vmap``.

For B images and K classes: one ``extract`` forward, one ``vjp`` of the head at the features, and the vjp
function vmapped over the K one-hot cotangents ``(K, B, num_classes)``. A per-class ``reduce(g, A)`` turns
each class's gradient into a map inside the vmap, so the caller gets ``(B, K, h, w)`` maps and never the
``(K, B, C, h, w)`` gradient (``chunk_size`` bounds how much of it exists at once).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from funcam.split import Features, Split

Reduce = Callable[[Tensor, Tensor], Tensor]  # (g (B, C, h, w), A (B, C, h, w)) -> map (B, h, w)


class CAM(NamedTuple):
    """maps: ``(B, K, h, w)`` raw maps at feature resolution (a tuple of them for a multi-layer split);
    classes: ``(B, K)`` class indices explained (None when ``classes`` was a score callable);
    logits: ``(B, num_classes)`` from the same forward."""

    maps: Any
    classes: Tensor | None
    logits: Tensor


def as_features(feats: Any) -> tuple[Features, Callable[[tuple], Any]]:
    """Normalise what ``extract`` returned to ``Features`` and a function putting new maps back in place."""
    if isinstance(feats, Features):
        return feats, lambda maps: Features(tuple(maps), feats.context, feats.chained)
    if isinstance(feats, Tensor):
        return Features((feats,)), lambda maps: maps[0]
    if isinstance(feats, (tuple, list)) and feats and all(isinstance(f, Tensor) for f in feats):
        kind = type(feats)
        return Features(tuple(feats)), lambda maps: kind(maps)
    raise TypeError(f"extract must return a Tensor, a tuple of Tensors or funcam.Features, got {type(feats).__name__}")


def check_input(x: Any, in_chans: int | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)} ({x.ndim} dims)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if in_chans is not None and x.shape[1] != in_chans:
        raise ValueError(f"x must have {in_chans} channels for this model, got shape {tuple(x.shape)}")


def resolve_classes(classes: Any, top_k: int | None, logits: Tensor) -> Tensor:
    """Class indices ``(B, K)`` from ``classes`` ((K,), (B, K), int, list) or the top-k of ``logits (B, N)``."""
    b, n = logits.shape
    if classes is None:
        k = 1 if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"top_k must be an int in [1, {n}] (the number of classes), got {top_k!r}")
        return logits.detach().topk(k, dim=1).indices
    if top_k is not None:
        raise ValueError("give either classes= or top_k=, not both")
    if isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    if isinstance(classes, (list, tuple)):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
            raise TypeError(f"classes must be integers, got {classes!r}")
        classes = torch.tensor(classes, dtype=torch.long, device=logits.device).reshape(-1)
    if not isinstance(classes, Tensor):
        raise TypeError(f"classes must be an int, a list of ints, a LongTensor (K,) or (B, K), or a callable "
                        f"logits -> (B, K) scores; got {type(classes).__name__}")
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise TypeError(f"classes must be an integer tensor, got dtype {classes.dtype}")
    if classes.ndim == 1:
        classes = classes.unsqueeze(0).expand(b, -1)
    elif classes.ndim != 2 or classes.shape[0] != b:
        raise ValueError(f"classes must have shape (K,) or (B, K) = ({b}, K), got shape {tuple(classes.shape)}")
    classes = classes.to(device=logits.device, dtype=torch.long)
    if not torch.compiler.is_compiling() and classes.numel():
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"classes must lie in [0, {n}) (the model has {n} classes), got values from {lo} to {hi}")
    return classes


def class_maps(split: Split, x: Tensor, classes: Any, reduce: Reduce, *, top_k: int | None = None,
               chunk_size: int | None = None) -> CAM:
    """Maps ``reduce(dlogit_k/dA, A)`` for every image and class; see ``funcam.cam`` for the arguments."""
    check_input(x, split.in_chans)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    score_fn = classes if callable(classes) else None
    if score_fn is not None and top_k is not None:
        raise ValueError("top_k does not apply when classes is a callable")
    feats, rebuild = as_features(split.extract(x))
    maps = feats.maps
    # A chained head recomputes maps[1:] from maps[0]; feeding them detached keeps outer autograd from
    # counting their dependence on x and the parameters twice (``.detach`` stops every level).
    primals = (maps[0],) + tuple(m.detach() for m in maps[1:]) if feats.chained else maps

    def scores(*ms: Tensor) -> tuple[Tensor, Tensor]:
        logits = split.head(rebuild(ms))
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise ValueError(f"head must return logits (B, num_classes), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
                             f" (a model in training mode can return a tuple: call model.eval() first)")
        return (score_fn(logits) if score_fn else logits), logits

    out, vjp_fn, logits = torch.func.vjp(scores, *primals, has_aux=True)
    if score_fn is not None:
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"the classes callable must return scores (B, K) = ({x.shape[0]}, K), got shape "
                             f"{tuple(out.shape)}")
        idx, picked = torch.arange(out.shape[1], device=out.device).expand(out.shape[0], -1), None
    else:
        idx = picked = resolve_classes(classes, top_k, logits)
    b, k = idx.shape
    if k == 0:
        empty = tuple(m.new_zeros((b, 0) + tuple(m.shape[2:])) for m in maps)
        return CAM(empty[0] if len(empty) == 1 else empty, picked, logits)
    # one-hot cotangents (K, B, N) by comparison: no data-dependent shapes, so it traces under compile.
    cot = (idx.T.unsqueeze(-1) == torch.arange(out.shape[1], device=out.device)).to(out.dtype)

    def per_class(ct: Tensor) -> tuple[Tensor, ...]:
        return tuple(reduce(g, a) for g, a in zip(vjp_fn(ct), maps))

    per = torch.func.vmap(per_class, chunk_size=chunk_size)(cot)  # each (K, B, h, w)
    result = tuple(p.movedim(0, 1) for p in per)
    return CAM(result[0] if len(result) == 1 else result, picked, logits)
