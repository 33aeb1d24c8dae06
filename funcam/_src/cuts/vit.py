"""The timm Vision Transformer route: a token feature inside the last block with the residual held constant, and
the attention probabilities of every block recomputed from its own parameters for rollout and relevance.

The feature is ``norm1(x)`` (before the last attention: CLS-pooled and distilled ViTs, whose head reads only prefix
tokens) or ``norm2(x1)`` (the pre-FFN feature: average / attention pooled ViTs). The head re-runs the rest of that
block from the feature with the block's residual input taken from ``Features.context``, then the final norm and
``forward_head``. Gradients w.r.t. the feature therefore flow only through attention/FFN, never around them through
the residual (Chefer et al. 2021 and pytorch-grad-cam's ViT recipe use the same feature; holding the residual fixed
keeps ``head`` pure). The route applies when the last block is a pre-norm block with plain softmax attention,
checked on the block itself (``vit_blocks_ok``); other ViTs take the graph route.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from funcam._src.base import Features, Split
from funcam._src.cuts.attention import Source, attend, attention_output, attention_probs, is_plain_attention
from funcam._src.cuts.blocks import cat_prefix, probe_tokens, same_update
from funcam._src.cuts.capture import SplitArgs, declared_in_chans

VIT_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("blocks", "patch_embed", "_pos_embed", "forward_head", "norm"))


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


def token_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    check_size(model, x)
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(pe.dynamic_feat_size(tuple(x.shape[-2:])))
    return tuple(pe.grid_size)


def vit_blocks_ok(model: nn.Module) -> bool:
    """Whether the last block computes ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))`` (pre-norm,
    plain softmax attention), the form ``vit_split`` re-runs: checked on random tokens against the block itself."""
    blk = model.blocks[-1]
    if any(not hasattr(blk, p) for p in VIT_BLOCK_PARTS) or not is_plain_attention(blk.attn):
        return False
    if any(m.training for m in blk.modules()) or torch.compiler.is_compiling():
        # dropout would make the comparison random, and a compiled region cannot branch on it: the parts and the
        # attention were checked
        return True
    p = next(blk.parameters(), None)
    if p is None:
        return False
    t = probe_tokens(int(blk.norm1.normalized_shape[0]) if hasattr(blk.norm1, "normalized_shape") else
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
    return same_update(want, got, t) and not same_update(want, post, t)



def applies(model: nn.Module, args: SplitArgs) -> bool:
    """A timm ViT without a named layer whose last block has the form ``vit_split`` re-runs (or token_cut= asks)."""
    return args.layer is None and is_vit(model) and (args.token_cut is not None or vit_blocks_ok(model))


def split(model: nn.Module, args: SplitArgs) -> Split:
    extract, head, layers, shifted = vit_split(model, args.token_cut)
    return Split(extract, head, declared_in_chans(model), layers, shifted=shifted)


def vit_split(model: nn.Module, token_cut: str | None) -> tuple[Callable, Callable, tuple[str], Callable | None]:
    """``(extract, head, (cut name,), shifted head or None)`` for a timm VisionTransformer (ViT, DeiT,
    DeiT-distilled, registers, MAP/avg pool); ``funcam.Split.shifted`` says what the shifted head is."""
    blk = model.blocks[-1]
    missing = [p for p in VIT_BLOCK_PARTS if not hasattr(blk, p)]
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
        grid = token_grid(model, x)
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
        return cat_prefix(prefix, rearrange(fmap, "b c h w -> b (h w) c"))

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
        out = t + blk.drop_path2(blk.ls2(mlp(cat_prefix(prefix, patches))))  # the head's tokens at s = 0
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
        return attend(attn, cat_prefix(prefix, shifted))[:, :p]
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



# --- attention: every block's probabilities from its own parameters -------------------------------------------------

def check_vit(model: nn.Module) -> None:
    """Raise unless ``model`` is a timm VisionTransformer of pre-norm blocks with plain softmax attention."""
    if not is_vit(model):
        raise ValueError(f"model must be a timm VisionTransformer (ViT, DeiT, registers) with attention blocks; "
                         f"got {type(model).__name__}, which has no transformer blocks to roll out")
    for i, blk in enumerate(model.blocks):
        missing = [p for p in VIT_BLOCK_PARTS if not hasattr(blk, p)]
        if missing or not is_plain_attention(blk.attn):
            attn = type(getattr(blk, "attn", None)).__name__
            raise ValueError(f"model.blocks[{i}] ({type(blk).__name__} with {attn}) is not a pre-norm timm Block "
                             f"with plain softmax Attention; rollout needs those")
    pool = getattr(model, "global_pool", "token")
    if type(model).__name__ != "VisionTransformerDistilled" and pool not in ("token", "avg"):
        raise ValueError(f"rollout reads the CLS row (global_pool='token') or the mean patch row "
                         f"(global_pool='avg'); this model has global_pool={pool!r}")



def _plain(model: nn.Module) -> bool:
    try:
        check_vit(model)
    except ValueError:
        return False
    return True


def attention(model: nn.Module, x: Tensor, graph: Any = None) -> Source | None:
    """The attention ``Source`` of a plain timm ViT (``check_vit``), else None (the graph route's)."""
    return vit_source(model, x) if _plain(model) else None


def vit_forward(model: nn.Module, x: Tensor, deltas: tuple[Tensor, ...] | None = None) -> tuple[Tensor, list[Tensor]]:
    """timm's forward with explicit attention: x (B, 3, H, W) -> (logits (B, classes), [probs (B, heads, N, N)]).

    ``deltas[l]`` (zeros) is added to block l's probabilities: the gradient w.r.t. it is the gradient w.r.t.
    the probabilities as an intermediate of the forward, which ``torch.func.vjp`` can only take of inputs.
    """
    check_size(model, x)
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    probs = []
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(t)
        p, v = attention_probs(blk.attn, h)
        if deltas is not None:
            p = p + deltas[i]
        probs.append(p)
        t = t + blk.drop_path1(blk.ls1(attention_output(blk.attn, h, p, v)))
        t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
    return model.forward_head(model.norm(t)), probs


def vit_source(model: nn.Module, x: Tensor) -> Source:
    gh, gw = token_grid(model, x)
    npre = int(getattr(model, "num_prefix_tokens", 1))
    n = npre + gh * gw
    idx = torch.arange(n, device=x.device)
    if type(model).__name__ != "VisionTransformerDistilled" and getattr(model, "global_pool", "token") == "avg":
        readout = (idx >= npre).to(x.dtype) / (n - npre)
    else:
        readout = (idx == 0).to(x.dtype)
    heads = [blk.attn.num_heads for blk in model.blocks]
    return Source(lambda inp, d: vit_forward(model, inp, d), lambda inp: tuple(inp.new_zeros(inp.shape[0], h, n, n)
                                                                        for h in heads),
                  len(heads), readout, npre, (gh, gw), model)

