"""Splits inside the last transformer block of timm ViTs and Swin, with the residual held constant.

The feature is a token feature of the last block: ``norm1(x)`` (before the last attention) or ``norm2(x1)``
(the pre-FFN feature). The head re-runs the rest of that block from the feature with the block's residual
input taken from ``Features.context``, then the final norm and ``forward_head``. Gradients w.r.t. the feature
therefore flow only through attention/FFN, never around them through the residual (Chefer et al. 2021 and
pytorch-grad-cam's ViT recipe use the same feature; holding the residual fixed keeps ``head`` pure).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from funcam._src.cuts.attention import attend, is_plain_attention
from funcam._src.cuts.shifted import swin_norm2_head
from funcam._src.base import Features

_VIT_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("blocks", "patch_embed", "_pos_embed", "forward_head", "norm"))


def is_swin(model: nn.Module) -> bool:
    layers = getattr(model, "layers", None)
    return (hasattr(model, "patch_embed") and isinstance(layers, nn.Sequential) and len(layers) > 0
            and hasattr(layers[-1], "blocks") and hasattr(layers[-1].blocks[-1], "_attn"))


def reads_prefix_only(model: nn.Module) -> bool:
    """True when the ViT's head reads only prefix tokens (CLS pooling, DeiT's CLS + distillation)."""
    if type(model).__name__ == "VisionTransformerDistilled":
        return True
    return getattr(model, "attn_pool", None) is None and getattr(model, "global_pool", None) == "token"


def check_size(model: nn.Module, x: Tensor) -> None:
    """Raise ValueError naming ``x`` when its size does not fit the patch embedding (timm would assert)."""
    pe = model.patch_embed
    size, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    h, w = x.shape[-2:]
    if size is None or patch is None:
        return
    if getattr(pe, "strict_img_size", False):
        if (h, w) != tuple(size):
            raise ValueError(f"x has size {h}x{w} but this {type(model).__name__} takes {size[0]}x{size[1]} only "
                             f"(resize the input, or create the model with dynamic_img_size=True)")
    elif not getattr(pe, "dynamic_img_pad", False) and (h % patch[0] or w % patch[1]):
        raise ValueError(f"x has size {h}x{w}, not a multiple of the patch size {patch[0]}x{patch[1]} "
                         f"(crop or pad the input, or create the model with dynamic_img_pad=True)")


def _grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    check_size(model, x)
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(pe.dynamic_feat_size(tuple(x.shape[-2:])))
    return tuple(pe.grid_size)


def vit_split(model: nn.Module, token_cut: str | None) -> tuple[Callable, Callable, tuple[str], Callable | None]:
    """``(extract, head, (cut name,), shifted head or None)`` for a timm VisionTransformer (ViT, DeiT,
    DeiT-distilled, registers, MAP/avg pool); ``funcam.Split.shifted`` says what the shifted head is."""
    blk = model.blocks[-1]
    missing = [p for p in _VIT_BLOCK_PARTS if not hasattr(blk, p)]
    if missing:
        raise ValueError(f"split: the last block of this ViT ({type(blk).__name__}) lacks {missing}; only "
                         f"pre-norm timm Blocks are supported, cut it with layer='NAME' instead")
    prefix_only = reads_prefix_only(model)
    if token_cut is None:
        token_cut = "norm1" if prefix_only else "norm2"
    elif token_cut == "norm2" and prefix_only:
        raise ValueError(
            "split: token_cut='norm2' on a ViT whose head reads only prefix tokens (global_pool='token' or "
            "DeiT-distilled): after the last attention no patch token reaches the logits, so every map would "
            "be exactly zero. Use token_cut='norm1' (the default for this model) to cut before the last attention")
    npre = int(getattr(model, "num_prefix_tokens", 1))

    def tokens_in(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        # timm's forward_features up to the last block (same calls, same order).
        grid = _grid(model, x)
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.patch_drop(t)
        t = model.norm_pre(t)
        for b in model.blocks[:-1]:
            t = b(t)
        return t, grid

    def to_map(f: Tensor, grid: tuple[int, int]) -> Tensor:
        return rearrange(f[:, npre:], "b (h w) c -> b c h w", h=grid[0], w=grid[1])

    def to_tokens(fmap: Tensor, prefix: Tensor) -> Tensor:
        return _cat(prefix, rearrange(fmap, "b c h w -> b (h w) c"))

    def finish(t: Tensor) -> Tensor:
        return model.forward_head(model.norm(t))

    if token_cut == "norm1":
        def extract(x: Tensor) -> Features:
            """x (B, 3, H, W) -> Features(maps=(norm1 tokens (B, C, h, w),), context=(x_in, prefix))."""
            t, grid = tokens_in(x)
            f = blk.norm1(t)
            return Features((to_map(f, grid),), (t, f[:, :npre]))

        def head(feats: Features, shift: Tensor | None = None) -> Tensor:
            (fmap,), (t, prefix) = feats.maps, feats.context
            if prefix_only:
                # Only prefix tokens reach the logits after the last block, so only their attention rows,
                # MLP and norms are computed (the patch tokens' would get an exactly zero gradient).
                patches = rearrange(fmap, "b c h w -> b (h w) c")
                t = t[:, :npre] + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, prefix, patches, shift)))
            else:
                if shift is not None:
                    fmap = fmap + shift[:, :, None, None]
                t = t + blk.drop_path1(blk.ls1(attend(blk.attn, to_tokens(fmap, prefix))))
            t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
            return finish(t)

        shifted = head if prefix_only else None
    else:
        def extract(x: Tensor) -> Features:
            """x (B, 3, H, W) -> Features(maps=(norm2 tokens (B, C, h, w),), context=(x1, prefix))."""
            t, grid = tokens_in(x)
            t = t + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(t))))
            f = blk.norm2(t)
            return Features((to_map(f, grid),), (t, f[:, :npre]))

        def head(feats: Features) -> Tensor:
            (fmap,), (t, prefix) = feats.maps, feats.context
            t = t + blk.drop_path2(blk.ls2(blk.mlp(to_tokens(fmap, prefix))))
            return finish(t)

        shifted = _mean_mlp_head(model, blk, npre)
    return extract, head, (f"blocks.{len(model.blocks) - 1}.{token_cut}",), shifted


def _mean_mlp_head(model: nn.Module, blk: nn.Module, npre: int) -> Callable | None:
    """For an average-pooled ViT cut at norm2: the head as a function of a shift ``s (B, C)`` added to every patch
    token of the feature, linearised at ``s = 0``, which is all the Jacobian in ``s`` (Grad-CAM's weights) needs.

    The head is ``forward_head(t + ls2(mlp(f)))`` with the tokens averaged first thing in ``forward_head``. With an
    MLP ``fc2(act(fc1(f)))`` (``act`` elementwise), the average over the patch tokens of the MLP's Jacobian is
    ``W2 diag(mean_j act'(fc1(f_j))) W1``: the shift moves the pooled token by that matrix times ``s``, so the
    Jacobian costs one (C, C) product per image instead of a pass over every token per direction.
    None where that form does not hold (another pooling, a norm before it, an MLP of another shape).
    """
    mlp = blk.mlp
    parts_ok = all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")) and isinstance(mlp.fc1, nn.Linear) and \
        isinstance(mlp.fc2, nn.Linear) and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
    if not parts_ok or getattr(model, "global_pool", None) != "avg" or not isinstance(model.norm, nn.Identity) \
            or getattr(model, "attn_pool", None) is not None:
        return None

    def shifted(feats: Features, shift: Tensor) -> Tensor:
        (fmap,), (t, prefix) = feats.maps, feats.context
        patches = rearrange(fmap, "b c h w -> b (h w) c")
        u = mlp.fc1(patches)
        # act' at every hidden unit and token (one jvp of the elementwise activation with unit tangents)
        _, slope = torch.func.jvp(mlp.act, (u,), (torch.ones_like(u),))
        out = t + blk.drop_path2(blk.ls2(mlp(_cat(prefix, patches))))  # the head's tokens at s = 0
        pooled = out[:, npre:].mean(dim=1, keepdim=True)  # what forward_head averages
        # d pooled / d s = ls2 W2 diag(mean_j act'_j) W1, applied to s: (B, C); as two 2-D products, which a vmap
        # over the shift's directions folds into the rows (a batched matrix-vector form copied W2 per direction)
        moved = nn.functional.linear(slope.mean(dim=1) * nn.functional.linear(shift, mlp.fc1.weight), mlp.fc2.weight)
        pooled = pooled + blk.ls2(moved).unsqueeze(1)
        return model.forward_head(torch.cat([out[:, :npre], pooled], dim=1))

    return shifted


def prefix_attention(attn: nn.Module, prefix: Tensor, patches: Tensor, shift: Tensor | None = None) -> Tensor:
    """The attention output of the prefix-token queries only: prefix (B, p, C), patches (B, n, C) -> (B, p, C).
    shift: (B, C) added to every patch token: the first-order expansion of
    ``prefix_attention(attn, prefix, patches + shift[:, None])`` at ``shift = 0`` (equal there, and so is its
    derivative in ``shift``: all the Jacobian in the shift needs; see ``vit_split``'s shifted head).

    Softmax attention (Vaswani et al. 2017, eq. 1) over the keys of all p + n tokens, with the key and value
    projections re-associated: q_h . k_j = (q_h W_kh) . x_j + q_h . b_kh and
    sum_j P_hj (W_vh x_j + b_vh) = W_vh (sum_j P_hj x_j) + b_vh (the rows of P sum to 1). Keys and values
    of the n patch tokens are never formed, so the gradient w.r.t. the patches is a sum of rank-one terms
    per head, (n, heads) x (heads, C), instead of an (n, C) x (C, C) product per class.
    Falls back to the full attention for a key norm (non-linear per token) or another attention module.

    The shift's term, per head h and prefix query: the patch scores move by delta = u . s (u = q_h W_kh, the same
    for every patch), so with S = sum_patches P_j, dP_j = P_j delta (1[j a patch] - S) and the attention output
    moves by W_vh (delta (sum_patches P_j x_j - S mixed) + S s), mixed = sum_j P_j x_j. Written with
    element-wise products and one 2-D matrix product in ``s``, a vmap over C directions of the shift never
    forms a per-direction copy of the patches (the batched ``einsum`` form made one of (C, B, n, C)).
    """
    p = prefix.shape[1]
    if not is_plain_attention(attn) or not isinstance(attn.k_norm, nn.Identity) or p == 0:
        shifted = patches if shift is None else patches + shift[:, None, :]
        return attend(attn, _cat(prefix, shifted))[:, :p]
    heads = attn.num_heads
    # qkv rows are ordered (three, heads, head_dim), as timm's reshape of the qkv output; unflatten rather
    # than einops here: einops registers a backend per tensor type, and a first nn.Parameter seen inside a
    # compiled region would add a guard that fails (recompiles) on the next call.
    w = attn.qkv.weight.unflatten(0, (3, heads, -1))  # (3, heads, d, C)
    b = None if attn.qkv.bias is None else attn.qkv.bias.unflatten(0, (3, heads, -1))  # (3, heads, d)
    q = torch.einsum("bpc,hdc->bhpd", prefix, w[0])
    if b is not None:
        q = q + b[0][None, :, None, :]
    q = attn.q_norm(q) * attn.scale
    u = torch.einsum("bhpd,hdc->bhpc", q, w[1])  # the query mapped back through W_k: (B, heads, p, C)
    on_patches = torch.einsum("bhpc,bnc->bhpn", u, patches)
    scores = torch.cat([torch.einsum("bhpc,bnc->bhpn", u, prefix), on_patches], -1)
    if b is not None:
        scores = scores + torch.einsum("bhpd,hd->bhp", q, b[1]).unsqueeze(-1)
    probs = attn.attn_drop(scores.softmax(dim=-1))  # (B, heads, p, p + n)
    from_patches = torch.einsum("bhpn,bnc->bhpc", probs[..., p:], patches)
    mixed = torch.einsum("bhpn,bnc->bhpc", probs[..., :p], prefix) + from_patches
    out = torch.einsum("bhpc,hdc->bphd", mixed, w[2])
    if b is not None:
        out = out + b[2]
    if shift is not None:
        on = probs[..., p:].sum(-1)  # S (B, heads, p)
        moved = torch.einsum("bhpc,hdc->bphd", from_patches - on.unsqueeze(-1) * mixed, w[2])  # W_vh (...)
        delta = (u * shift[:, None, None, :]).sum(-1)  # u . s (B, heads, p)
        vs = nn.functional.linear(shift, w[2].flatten(0, 1)).unflatten(-1, (heads, -1))  # W_vh s (B, heads, d)
        out = out + delta.transpose(1, 2).unsqueeze(-1) * moved + on.transpose(1, 2).unsqueeze(-1) * vs[:, None]
    gate = attn.gate(prefix).sigmoid() if getattr(attn, "gate", None) is not None else None
    out = attn.norm(rearrange(out, "b p h d -> b p (h d)"))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def swin_split(model: nn.Module, token_cut: str | None) -> tuple[Callable, Callable, tuple[str], Callable | None]:
    """``(extract, head, (cut name,), shifted head or None)`` for a timm SwinTransformer: a token feature of the last
    block, NHWC -> NCHW; the norm2 cut has a shifted head where its form holds (``funcam._src.cuts.shifted``)."""
    stage = model.layers[-1]
    blk = stage.blocks[-1]
    token_cut = token_cut or "norm2"

    def tokens_in(x: Tensor) -> Tensor:
        check_size(model, x)
        t = model.patch_embed(x)
        for s in model.layers[:-1]:
            t = s(t)
        t = stage.downsample(t)
        for b in stage.blocks[:-1]:
            t = b(t)
        return t  # (B, h, w, C)

    def finish(t: Tensor) -> Tensor:
        return model.forward_head(model.norm(t))

    if token_cut == "norm1":
        def extract(x: Tensor) -> Features:
            """x (B, 3, H, W) -> Features(maps=(norm1 (B, C, h, w),), context=(x_in,))."""
            t = tokens_in(x)
            return Features((rearrange(blk.norm1(t), "b h w c -> b c h w"),), (t,))

        def head(feats: Features) -> Tensor:
            (fmap,), (t,) = feats.maps, feats.context
            b, h, w, c = t.shape
            t = t + blk.drop_path1(blk._attn(rearrange(fmap, "b c h w -> b h w c")))
            t = t.reshape(b, h * w, c)
            t = t + blk.drop_path2(blk.mlp(blk.norm2(t)))
            return finish(t.reshape(b, h, w, c))
    else:
        def extract(x: Tensor) -> Features:
            """x (B, 3, H, W) -> Features(maps=(norm2 (B, C, h, w),), context=(x1 (B, h, w, C),))."""
            t = tokens_in(x)
            t = t + blk.drop_path1(blk._attn(blk.norm1(t)))
            return Features((rearrange(blk.norm2(t), "b h w c -> b c h w"),), (t,))

        def head(feats: Features) -> Tensor:
            (fmap,), (t,) = feats.maps, feats.context
            t = t + blk.drop_path2(blk.mlp(rearrange(fmap, "b c h w -> b h w c")))
            return finish(t)
    shifted = swin_norm2_head(model, blk) if token_cut == "norm2" else None
    return extract, head, (f"layers.{len(model.layers) - 1}.blocks.{len(stage.blocks) - 1}.{token_cut}",), shifted


def _cat(prefix: Tensor, patches: Tensor) -> Tensor:
    return torch.cat([prefix, patches], dim=1) if prefix.shape[1] else patches


# --- which timm routes apply: checked on the model's own blocks, not on class names ----------------------------------

def _probe_tokens(c: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A fixed, irregular probe input (B, ..., C) in ``like``'s dtype and device."""
    n = math.prod(shape) * c
    t = torch.arange(n, dtype=torch.float64).mul(0.7).sin().mul(torch.arange(n, dtype=torch.float64).mul(1.3).cos())
    return t.reshape(*shape, c).mul(2).to(dtype=like.dtype, device=like.device)


def _same(want: Tensor, got: Tensor, t: Tensor) -> bool:
    """Whether a block's output ``want`` and a formula's ``got`` update the block input ``t`` the same way, up to
    the rounding of the dtype (the fused and explicit attention round differently), relative to the size of the
    update: layer scales of 1e-5 make every update tiny, and a formula of another form is off by O(1) of it."""
    if want.shape != got.shape:
        return False
    tol = max(1e-4, 16 * torch.finfo(want.dtype).eps)
    update = (want - t).abs().amax()
    return bool((want - got).abs().amax() <= tol * update + torch.finfo(want.dtype).tiny)


def vit_blocks_ok(model: nn.Module) -> bool:
    """Whether the last block computes ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))`` (pre-norm,
    plain softmax attention), the form ``vit_split`` re-runs: checked on random tokens against the block itself."""
    blk = model.blocks[-1]
    if any(not hasattr(blk, p) for p in _VIT_BLOCK_PARTS) or not is_plain_attention(blk.attn):
        return False
    if any(m.training for m in blk.modules()) or torch.compiler.is_compiling():
        # dropout would make the comparison random, and a compiled region cannot branch on it: the parts and the
        # attention were checked
        return True
    p = next(blk.parameters(), None)
    if p is None:
        return False
    t = _probe_tokens(int(blk.norm1.normalized_shape[0]) if hasattr(blk.norm1, "normalized_shape") else
                      int(p.shape[-1]), (1, 5), p)
    with torch.no_grad():
        try:
            want = blk(t)
        except Exception:  # noqa: BLE001 - a block that needs more than tokens (rope, masks): not this form
            return False
        t1 = t + blk.drop_path1(blk.ls1(attend(blk.attn, blk.norm1(t))))
        got = t1 + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t1))))
        u1 = t + blk.drop_path1(blk.ls1(blk.norm1(attend(blk.attn, t))))
        post = u1 + blk.drop_path2(blk.ls2(blk.norm2(blk.mlp(u1))))
    # the pre-norm form, and not also the post-norm one: weights that make both forms equal (zero-initialised
    # layer scales or norms) cannot tell them apart, and the graph route is exact for either
    return _same(want, got, t) and not _same(want, post, t)


def swin_blocks_ok(model: nn.Module) -> bool:
    """Whether the last Swin block is pre-norm, ``x + attn(norm1(x))`` (Swin v1), the form ``swin_split`` re-runs;
    SwinV2's post-norm blocks (``x + norm1(attn(x))``) are not, and go through the graph route."""
    blk = model.layers[-1].blocks[-1]
    if not all(hasattr(blk, a) for a in ("norm1", "_attn", "drop_path1", "norm2", "mlp", "drop_path2")):
        return False
    if any(m.training for m in blk.modules()) or torch.compiler.is_compiling():
        return False  # no random comparison: the graph route is exact for either form
    res = getattr(blk, "input_resolution", None) or getattr(blk, "window_size", None)
    p = next(blk.parameters(), None)
    if res is None or p is None or not hasattr(blk.norm1, "normalized_shape"):
        return False
    t = _probe_tokens(int(blk.norm1.normalized_shape[0]), (1, int(res[0]), int(res[1])), p)
    with torch.no_grad():
        try:
            want = blk(t)
        except Exception:  # noqa: BLE001
            return False
        b, h, w, c = t.shape
        t1 = (t + blk.drop_path1(blk._attn(blk.norm1(t)))).reshape(b, h * w, c)
        got = (t1 + blk.drop_path2(blk.mlp(blk.norm2(t1)))).reshape(b, h, w, c)
        u1 = (t + blk.drop_path1(blk.norm1(blk._attn(t)))).reshape(b, h * w, c)
        post = (u1 + blk.drop_path2(blk.norm2(blk.mlp(u1)))).reshape(b, h, w, c)
    # pre-norm and not also post-norm: SwinV2's zero-initialised post-norms make the two forms equal
    return _same(want, got, t) and not _same(want, post, t)


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
