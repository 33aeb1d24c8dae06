"""The timm Swin Transformer (v1) route: a token feature inside the last block (NHWC -> NCHW) with the residual held
constant, as the ViT route does; the norm2 cut has a shifted head (``funcam.Split.shifted``) where its form holds:
one (C, C) matrix per image instead of a pass over every token per direction. SwinV2's post-norm blocks take the
graph route.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from funcam._src.base import Features, Split
from funcam._src.cuts.attention import Source
from funcam._src.cuts.blocks import agrees, norm_mlp_jacobian, probe_tokens, same_update
from funcam._src.cuts.capture import SplitArgs, declared_in_chans
from funcam._src.cuts.vit import check_size


def is_swin(model: nn.Module) -> bool:
    layers = getattr(model, "layers", None)
    return (hasattr(model, "patch_embed") and isinstance(layers, nn.Sequential) and len(layers) > 0
            and hasattr(layers[-1], "blocks") and hasattr(layers[-1].blocks[-1], "_attn"))


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
    t = probe_tokens(int(blk.norm1.normalized_shape[0]), (1, int(res[0]), int(res[1])), p)
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
    return same_update(want, got, t) and not same_update(want, post, t)



def applies(model: nn.Module, args: SplitArgs) -> bool:
    """A timm Swin without a named layer whose last block is pre-norm (or token_cut= asks)."""
    return args.layer is None and is_swin(model) and (args.token_cut is not None or swin_blocks_ok(model))


def split(model: nn.Module, args: SplitArgs) -> Split:
    extract, head, layers, shifted = swin_split(model, args.token_cut)
    return Split(extract, head, declared_in_chans(model), layers, shifted=shifted)


def attention(model: nn.Module, x: Tensor, graph: Any = None) -> Source | None:
    return None  # window attention: the graph route finds each window's probabilities


def swin_split(model: nn.Module, token_cut: str | None) -> tuple[Callable, Callable, tuple[str], Callable | None]:
    """``(extract, head, (cut name,), shifted head or None)`` for a timm SwinTransformer: a token feature of the last
    block, NHWC -> NCHW; the norm2 cut has a shifted head where its form holds (``swin_norm2_head``)."""
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


def swin_norm2_head(model: nn.Module, blk: nn.Module) -> Callable | None:
    """The shifted head of ``swin_split``'s norm2 cut (the last block ``blk``), or None where its form does not hold.

    The head is ``forward_head(norm(t + drop_path2(mlp(f))))`` on NHWC tokens, with ``forward_head`` averaging
    over h, w first: the shift moves the pooled token by ``P s`` (``norm_mlp_jacobian``), and the rest of the head
    is applied to the moved pooled token as a 1x1 map (the average of one position is itself). Its value at s = 0 is
    the head's and so is its Jacobian in s, ``G P`` with G the rest of the head's Jacobian at the pooled token.

    The form is checked on the modules: ``mlp`` is ``fc2(act(fc1(.)))`` with Linear layers and no norm inside,
    ``model.norm`` a LayerNorm over C or Identity, the head's global pool 'avg', and no layer scale in ``blk``;
    outside a compiled region and with the parts in eval mode, also on a random probe (``_form_holds``). A model in
    training mode (dropout, drop-path) runs the plain shifted head ``head(f + s)`` at every call.
    """
    mlp, norm = blk.mlp, model.norm
    c = getattr(mlp.fc1, "in_features", None) if hasattr(mlp, "fc1") else None
    pool = getattr(getattr(model, "head", None), "global_pool", None)
    ok = (all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")) and isinstance(mlp.fc1, nn.Linear)
          and isinstance(mlp.fc2, nn.Linear) and mlp.fc2.out_features == c
          and mlp.fc1.out_features == mlp.fc2.in_features
          and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
          and (isinstance(norm, nn.Identity) or isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (c,))
          and getattr(pool, "pool_type", None) == "avg"
          and isinstance(getattr(blk, "ls2", nn.Identity()), nn.Identity))  # the head applies no layer scale
    if not ok:
        return None
    if not torch.compiler.is_compiling() and not _training(model, blk) and not _form_holds(model, blk, c):
        return None

    def shifted(feats: Features, shift: Tensor) -> Tensor:
        (fmap,), (t,) = feats.maps, feats.context
        f = rearrange(fmap, "b c h w -> b h w c")
        if _training(model, blk):  # dropout: the linearisation would not be the head's; the plain route instead
            return model.forward_head(model.norm(t + blk.drop_path2(blk.mlp(f + shift[:, None, None, :]))))
        y = t + blk.drop_path2(blk.mlp(f))  # the norm's input at s = 0, (B, h, w, C)
        pooled = model.norm(y).mean(dim=(1, 2))  # what forward_head's average pool gives: (B, C)
        p = norm_mlp_jacobian(blk.mlp, model.norm, rearrange(f, "b h w c -> b (h w) c"),
                              rearrange(y, "b h w c -> b (h w) c"))
        # s @ P^T one image at a time: under the engine's vmap over tangents, the batch rules of bmm / einsum expand the
        # unbatched P to every direction (a (C, B, C, C) copy), while a 2-D product folds the directions into its rows
        moved = pooled + torch.stack([shift[i] @ p[i].T for i in range(p.shape[0])])
        return model.forward_head(moved[:, None, None, :])

    return shifted


def _training(model: nn.Module, blk: nn.Module) -> bool:
    """Whether a part after the cut is in training mode (dropout and drop-path are identities in eval only)."""
    return blk.drop_path2.training or any(m.training for m in blk.mlp.modules()) or \
        any(m.training for m in model.head.modules())


def _form_holds(model: nn.Module, blk: nn.Module, c: int) -> bool:
    """Whether ``forward_head(norm(t + drop_path2(mlp(f))))`` equals ``forward_head`` of the 1x1 mean of
    ``LN(t + fc2(act(fc1(f))))`` (LN the formula with ``model.norm``'s parameters, or nothing for Identity) on random
    tokens, and ``act`` acts on each element alone: what ``norm_mlp_jacobian`` assumes of the modules."""
    p = next(model.parameters(), None)
    if p is None:
        return False
    g = torch.Generator().manual_seed(0)
    f, t = (torch.randn(2, 2, 3, c, generator=g, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
            for _ in range(2))
    mlp, norm = blk.mlp, model.norm
    with torch.no_grad():
        try:
            want = model.forward_head(norm(t + blk.drop_path2(mlp(f))))
            u = mlp.fc1(f)
            act = mlp.act(u)
            alone = mlp.act(u.reshape(-1, 1)).reshape(u.shape)
            y = t + mlp.fc2(act)
            if isinstance(norm, nn.LayerNorm):
                y = F.layer_norm(y, (c,), norm.weight, norm.bias, norm.eps)
            got = model.forward_head(y.mean(dim=(1, 2), keepdim=True))
        except Exception:  # noqa: BLE001 - a part that does not take these shapes: not this form
            return False
    return agrees(got, want) and agrees(alone, act)

