"""The timm ``forward_features`` route: models whose ``forward_features`` returns a feature map (NCHW, or NHWC as
MambaOut; read from the output's shape) are cut there, with timm's own ``forward_head``. A head that starts with
global average pooling gets ``Split.pooled`` (the exact fast path for many classes); VGG's ConvMlp head gets a
shifted head (``Split.shifted``, Grad-CAM's weights from one (D, C) product per shift direction).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from funcam._src.base import Features, Pooled, Split
from funcam._src.cuts.attention import Source
from funcam._src.cuts.blocks import agrees
from funcam._src.cuts.capture import SplitArgs, declared_in_chans


def applies(model: nn.Module, args: SplitArgs) -> bool:
    """A timm model (``forward_features``, ``forward_head``, ``num_features``) without a named layer or token cut whose
    ``forward_features`` gives a feature map; inside a compiled region (no probe) assumed NCHW."""
    if args.layer is not None or args.token_cut is not None:
        return False
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")
            and isinstance(getattr(model, "num_features", None), int)):
        return False
    return torch.compiler.is_compiling() or features_layout(model) is not None


def split(model: nn.Module, args: SplitArgs) -> Split:
    # inside a compiled region the shape probe cannot run: timm's split, its layout read at every call
    compiling = torch.compiler.is_compiling()
    layout = "NCHW" if compiling else features_layout(model)
    extract, head, layers = features_split(model, None if compiling else layout)
    pooled = pooled_head(model) if layout == "NCHW" else None
    shifted = conv_mlp_head(model) if layout == "NCHW" and pooled is None else None
    return Split(extract, head, declared_in_chans(model), layers, pooled, shifted=shifted)


def attention(model: nn.Module, x: Tensor, graph: Any = None) -> Source | None:
    return None  # the graph route finds the attention of hybrid models


def features_layout(model: nn.Module) -> str | None:
    """'NCHW' or 'NHWC' when ``forward_features`` returns a 4-D map whose channel axis is ``num_features``, else
    None (tokens, an ambiguous shape, or a forward that the probe cannot run).

    The probe runs ``forward_features`` once on one small blank image (64x64, under no_grad; the buffers of a
    training-mode model are restored). The channel axis is the one of size ``num_features`` (timm's width of
    ``forward_features``); when both or neither of axes 1 and 3 have it, the layout is left to the graph route.
    """
    c = getattr(model, "num_features", None)
    p = next(model.parameters(), None)
    chans = getattr(model, "in_chans", None) or _first_conv_channels(model)
    if not isinstance(c, int) or p is None or not isinstance(chans, int):
        return None
    x = p.new_zeros((1, chans, 64, 64))  # only the output's shape is read
    saved = [(b, b.detach().clone()) for m in model.modules() if m.training for b in m.buffers(recurse=False)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape = tuple(model.forward_features(x).shape)
    except Exception:  # noqa: BLE001 - any failure (a fixed input size) leaves the decision to the graph route
        return None
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return _layout(shape, c)


def _layout(shape: tuple[int, ...], c: int) -> str | None:
    if len(shape) != 4:
        return None
    first, last = shape[1] == c, shape[3] == c
    return "NCHW" if first and not last else "NHWC" if last and not first else None


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def features_split(model: nn.Module, layout: str | None) -> tuple[Callable, Callable, tuple[str]]:
    """timm's own ``forward_features`` / ``forward_head``; a channels-last feature becomes ``(B, C, h, w)``.

    layout: what ``features_layout`` found at split time, used where an output's shape does not tell (a grid as
    wide as the channels); None inside a compiled region, where the probe cannot run and each output's shape
    decides (the axis of size ``num_features`` is the channel axis).
    """
    c = int(model.num_features)

    def extract(x: Tensor) -> Tensor | Features:
        """x (B, C, H, W) -> forward_features (B, C, h, w), or Features(maps=((B, C, h, w),), context=('NHWC',))
        for a channels-last feature (B, h, w, C)."""
        y = model.forward_features(x)
        found = _layout(tuple(y.shape), c) if y.ndim == 4 else None
        if found is None and y.ndim == 4 and y.shape[1] == y.shape[3] == c:
            found = layout  # both axes have the channels' width: the split-time probe's answer
        if found == "NCHW":
            return y
        if found == "NHWC":
            return Features((rearrange(y, "b h w c -> b c h w"),), ("NHWC",))
        raise ValueError(f"split: forward_features of {type(model).__name__} returned shape {tuple(y.shape)}, "
                         f"not a feature map with {c} channels whose channel axis funcam can tell"
                         + ("; build this split outside torch.compile, where funcam can cut the model's graph"
                            if layout is None else ""))

    def head(feats: Tensor | Features) -> Tensor:
        if isinstance(feats, Features):
            return model.forward_head(rearrange(feats.maps[0], "b c h w -> b h w c"))
        return model.forward_head(feats)

    return extract, head, ("forward_features",)


def pooled_head(model: nn.Module) -> Pooled | None:
    """``Pooled`` for a timm model whose ``forward_head`` starts with global average pooling, else None.

    timm's ``forward_head(x, pre_logits=True)`` stops before the classifier; fed a ``(B, C, 1, 1)`` map it
    equals the head at any map with that spatial mean iff the head's first operation is average pooling.
    The structure is checked first (an average ``global_pool``), then numerically on a random probe, so a
    head that pools otherwise (max, attention, a 7x7 conv as in VGG) keeps the general path.
    """
    if torch.compiler.is_compiling():
        return None  # the probe branches on values; a split built inside a compiled region uses the general path
    pool = getattr(model, "global_pool", None)
    if pool is None:
        pool = getattr(getattr(model, "head", None), "global_pool", None)
    if getattr(pool, "pool_type", None) != "avg" or not hasattr(model, "get_classifier"):
        return None
    clf = model.get_classifier()
    clf = clf if isinstance(clf, nn.Linear) else None

    def pre_logits(z: Tensor) -> Tensor:
        return model.forward_head(z[:, :, None, None], pre_logits=clf is not None)

    try:
        param = next(model.parameters())
        c = int(model.num_features)
        probe = torch.randn(2, c, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = probe.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            want = model.forward_head(probe)
            p = pre_logits(probe.mean(dim=(2, 3)))
            got = clf(p) if clf is not None else p
        ok = want.shape == got.shape and torch.allclose(want, got, rtol=1e-3, atol=1e-4)
    except Exception:  # noqa: BLE001 - any head that does not take a pooled map keeps the general path
        return None
    return Pooled(pre_logits, clf) if ok else None


def conv_mlp_head(model: nn.Module) -> Callable | None:
    """For a timm model whose ``forward_head`` is ``head(pre_logits(A))`` with a convolutional MLP first
    (``fc1`` a Conv2d without padding, ``act1``, ``drop``, ``fc2``, ``act2``: VGG's ConvMlp): the head with a shift
    ``s (B, C)`` added at every position of A, exact for any s.

    ``fc1`` is linear, and without padding every tap of its kernel lands inside the map, so
    ``fc1(A + s) = fc1(A) + (sum_{kh, kw} W1[:, :, kh, kw]) s`` at every output position (Simonyan & Zisserman
    2015's fc6 as a 7x7 convolution): the shift enters as one (D, C) product instead of a 7x7 convolution per
    direction and image. None where that form does not hold, checked on the modules and on a random probe (eval
    mode, outside a compiled region): padding, groups or dilation in fc1, a model in training mode (dropout),
    or a head that is not ``head(fc2-part(fc1(A)))``.
    """
    pl, head = getattr(model, "pre_logits", None), getattr(model, "head", None)
    parts = ("fc1", "act1", "drop", "fc2", "act2")
    if pl is None or head is None or not all(hasattr(pl, p) for p in parts) or not isinstance(pl.fc1, nn.Conv2d):
        return None
    fc1 = pl.fc1
    if tuple(fc1.padding) != (0, 0) or fc1.groups != 1 or tuple(fc1.dilation) != (1, 1) or fc1.padding_mode != "zeros":
        return None
    if torch.compiler.is_compiling() or model.training:
        return None

    fc2 = pl.fc2
    as_linear = isinstance(fc2, nn.Conv2d) and tuple(fc2.kernel_size) == (1, 1) and tuple(fc2.stride) == (1, 1) \
        and tuple(fc2.padding) == (0, 0) and fc2.groups == 1

    def rest(z: Tensor) -> Tensor:
        z = pl.drop(pl.act1(z))
        if as_linear and z.shape[-2:] == (1, 1):
            # a 1x1 convolution of a 1x1 map is a Linear: as one, a vmap over the shift's directions folds them into
            # the rows of one matrix product (the batched convolution ran about 3x slower)
            z = F.linear(z[:, :, 0, 0], fc2.weight[:, :, 0, 0], fc2.bias)[:, :, None, None]
        else:
            z = fc2(z)
        return head(pl.act2(z))

    def shifted(feats: Features, shift: Tensor) -> Tensor:
        (a,) = feats.maps
        if a.shape[-2] < fc1.kernel_size[0] or a.shape[-1] < fc1.kernel_size[1]:
            # ConvMlp pools a map smaller than its kernel up to the kernel's size first: the plain head then
            return model.forward_head(a + shift[:, :, None, None])
        moved = F.linear(shift, fc1.weight.sum(dim=(2, 3)))  # (B, D): the shift's term at every output position
        return rest(fc1(a) + moved[:, :, None, None])

    if not _conv_mlp_form_holds(model, fc1, shifted):
        return None
    return shifted


def _conv_mlp_form_holds(model: nn.Module, fc1: nn.Conv2d, shifted: Callable) -> bool:
    """Whether ``shifted(A, s)`` equals ``forward_head(A + s)`` on a random map at the kernel's size plus one, and a
    random shift."""
    p = fc1.weight
    g = torch.Generator().manual_seed(0)
    kh, kw = fc1.kernel_size
    a = torch.randn(2, fc1.in_channels, kh + 1, kw + 1, generator=g, dtype=torch.float64).to(p)
    s = torch.randn(2, fc1.in_channels, generator=g, dtype=torch.float64).to(p)
    with torch.no_grad():
        try:
            want = model.forward_head(a + s[:, :, None, None])
            got = shifted(Features((a,), ()), s)
        except Exception:  # noqa: BLE001 - a part that does not take these shapes: not this form
            return False
    return agrees(got, want)

