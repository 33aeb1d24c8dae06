"""CLIP image towers as splits: open_clip's ModifiedResNet (RN50, ...) and VisionTransformer, Hugging Face's
``CLIPVisionModelWithProjection`` and ``CLIPModel``; the split's head returns the image embedding ``(B, D)``, to
explain with ``funcam.targets.prompts``.

* ModifiedResNet: the map of ``layer4`` (NCHW), the head CLIP's attention pool (one query, the mean token; Radford et
  al. 2021, sec. 2.4).
* ViT towers that pool the CLS token: the token feature before the last attention (``ln_1`` / ``layer_norm1`` of the
  last block, 1 + h*w tokens), the residual stream held constant as in funcam's timm ViT route; the head computes the
  CLS token's path only.

Both heads are one-query softmax attentions over all tokens, computed by ``pooled_attention`` with the key and
value projections re-associated onto the query, so no per-token projection is ever formed: the head and its
derivatives cost O(C^2 + heads N C) per image instead of O(N C^2). With Grad-CAM's forward-mode route over the
grid's positions (``funcam._src.core.engine``) K = 1000 prompts then cost a few percent of a forward.
The forms are checked: on the modules' types and attributes, then ``head(extract(x)) == tower(x)`` on a random image
at the tower's size (eval mode, outside a compiled region). ``applies`` is False for other towers (attention pools,
average pooling, custom blocks), which the graph route takes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from funcam._src.base import Features, Split


def pooled_attention(query: Tensor, tokens: Tensor, proj: tuple, heads: int, scale: float,
                     shift: Tensor | None = None) -> Tensor:
    """One query's softmax attention over N tokens, before the output projection: query (B, C), tokens (B, N, C)
    -> (B, C). shift: (B, C) added to every token but the first (a ViT's patch tokens, not its CLS token).

    proj: ``(w_q, b_q, w_k, b_k, w_v, b_v)``, weights (C, C), biases (C,) or None. Per head h (Vaswani et al. 2017,
    eq. 1), with q_h = scale (W_qh query + b_qh): the score of token j is q_h . (W_kh x_j + b_kh) = u_h . x_j + q_h .
    b_kh with u_h = W_kh^T q_h, and the second term, the same for every token, cancels in the softmax; the output
    is sum_j P_hj (W_vh x_j + b_vh) = W_vh (sum_j P_hj x_j) + b_vh since the P_hj sum to 1. So keys and values are
    never formed: (heads, C) x (C, N) products per image instead of (N, C) x (C, C) ones. A shift s of tokens 1..N-1
    moves their scores by u_h . s and the mixed token by (sum_{j >= 1} P_hj) s, exactly: forward mode in s then
    never forms a tangent of the tokens (the Jacobian route's cheap head, ``funcam.Split.shifted``).
    """
    wq, bq, wk, _, wv, bv = proj
    d = query.shape[-1] // heads
    q = F.linear(query, wq, bq) * scale  # (B, C)
    # Every product with an unbatched operand is an F.linear with a 2-D weight: the weights head by head, the tokens
    # image by image. Under the engine's vmap over directions a batched matmul, einsum or bmm copies its unbatched
    # operand once per direction, while F.linear folds the directions into its rows.
    rows = [slice(h * d, (h + 1) * d) for h in range(heads)]
    u = torch.stack([F.linear(q[:, r], wk[r].T) for r in rows], dim=1)  # (B, heads, C)
    scores = torch.stack([F.linear(u[i], tokens[i]) for i in range(tokens.shape[0])])  # (B, heads, N)
    if shift is not None:  # the first token does not move
        scores = torch.cat([scores[..., :1], scores[..., 1:] + (u * shift[:, None, :]).sum(-1, keepdim=True)], -1)
    probs = scores.softmax(dim=-1)
    mixed = torch.stack([F.linear(probs[i], tokens[i].T) for i in range(tokens.shape[0])])  # (B, heads, C)
    if shift is not None:
        mixed = mixed + probs[..., 1:].sum(-1, keepdim=True) * shift[:, None, :]
    return torch.cat([F.linear(mixed[:, h], wv[r], None if bv is None else bv[r]) for h, r in enumerate(rows)], -1)


def _open_clip_resnet(v: nn.Module) -> bool:
    ap = getattr(v, "attnpool", None)
    return (type(v).__name__ == "ModifiedResNet" and callable(getattr(v, "stem", None))
            and all(hasattr(v, f"layer{i}") for i in range(1, 5)) and type(ap).__name__ == "AttentionPool2d"
            and all(isinstance(getattr(ap, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "c_proj")))


def _open_clip_vit(v: nn.Module) -> bool:
    blocks = getattr(getattr(v, "transformer", None), "resblocks", None)
    if type(v).__name__ != "VisionTransformer" or not blocks or getattr(v, "attn_pool", 1) is not None:
        return False
    blk = blocks[-1]
    mha = getattr(blk, "attn", None)
    return (getattr(v, "pool_type", None) == "tok" and not getattr(v, "output_tokens", False)
            and all(hasattr(v, a) for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post",
                                            "patch_dropout", "proj"))
            and type(blk).__name__ == "ResidualAttentionBlock" and not hasattr(blk, "ln_1_kv")
            and isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim and mha.bias_k is None
            and not mha.add_zero_attn)


def _hf_vit(model: nn.Module) -> bool:
    vm = getattr(model, "vision_model", None)
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if type(model).__name__ not in ("CLIPModel", "CLIPVisionModelWithProjection") or not layers:
        return False
    attn = getattr(layers[-1], "self_attn", None)
    return (isinstance(getattr(model, "visual_projection", None), nn.Linear)
            and all(hasattr(vm, a) for a in ("embeddings", "pre_layrnorm", "post_layernorm"))
            and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj")))


def tower(model: nn.Module) -> nn.Module:
    """The image tower of an open_clip CLIP model (``model.visual``); any other model as it is."""
    v = getattr(model, "visual", None)
    return v if isinstance(v, nn.Module) and (_open_clip_resnet(v) or _open_clip_vit(v)) else model


def applies(model: nn.Module) -> bool:
    """Whether ``split`` takes this model: an open_clip CLIP model or image tower, or a Hugging Face CLIP model, of
    one of the forms in the module docstring."""
    v = tower(model)
    return _open_clip_resnet(v) or _open_clip_vit(v) or _hf_vit(v)


def split(model: nn.Module) -> Split:
    """``Split(extract, head)`` of a CLIP model's image tower: ``x (B, 3, H, W)`` -> ``Features`` -> image
    embedding ``(B, D)``. ValueError for a model ``applies`` refuses, or whose form the probe does not confirm."""
    v = tower(model)
    if _open_clip_resnet(v):
        extract, head, layers, shifted = _resnet_parts(v)
    elif _open_clip_vit(v):
        extract, head, layers, shifted = _open_clip_vit_parts(v)
    elif _hf_vit(v):
        extract, head, layers, shifted = _hf_vit_parts(v)
    else:
        raise ValueError(f"clip split: {type(model).__name__} is not an open_clip or Hugging Face CLIP image tower "
                         f"of a supported form (CLS-pooled ViT or attention-pooled ModifiedResNet); use "
                         f"funcam.split(model)")
    # a module whose output is the embedding: the tower itself, or a CLIPModel's image features
    module = ImageFeatures(v) if type(v).__name__ == "CLIPModel" else v
    size = image_size(v)

    def checked(x: Tensor) -> Features:
        # the positional embeddings fix the grid: another size would fail deep inside the head
        if tuple(x.shape[-2:]) != size:
            raise ValueError(f"x must be {size[0]}x{size[1]} for this CLIP tower (its positional embeddings fix "
                             f"the input size), got shape {tuple(x.shape)}; resize the images first")
        return extract(x)

    sp = Split(checked, head, 3, layers, module=module, shifted=shifted)
    _confirm(sp, module, v)
    return sp


class ImageFeatures(nn.Module):
    """A Hugging Face ``CLIPModel`` as its image tower: ``x (B, 3, H, W) -> get_image_features(x)`` embeddings
    ``(B, D)``, the module a split's graph-based functions (attention relevance) capture. Holds the model, changes
    nothing in it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, x: Tensor) -> Tensor:
        out = self.model.get_image_features(x)
        return getattr(out, "pooler_output", out)  # transformers 5 wraps the embeddings in an output


def _resnet_parts(v: nn.Module) -> tuple[Callable, Callable, tuple[str], Callable]:
    ap = v.attnpool
    proj = (ap.q_proj.weight, ap.q_proj.bias, ap.k_proj.weight, ap.k_proj.bias, ap.v_proj.weight, ap.v_proj.bias)

    def extract(x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> layer4's map (B, C, h, w)."""
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))

    def tokens(a: Tensor) -> Tensor:
        """(B, C, h, w) -> the attention pool's tokens (B, 1 + h w, C): the map's mean, its positions, plus the
        positional embedding."""
        t = rearrange(a, "b c h w -> b (h w) c")
        return torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + ap.positional_embedding.to(t.dtype)

    def head(a: Tensor) -> Tensor:
        """layer4's map (B, C, h, w) -> the attention pool's embedding (B, D); the mean token is the one query."""
        t = tokens(a)
        c = t.shape[-1]
        return ap.c_proj(pooled_attention(t[:, 0], t, proj, ap.num_heads, (c // ap.num_heads) ** -0.5))

    def shifted(feats: Features, s: Tensor) -> Tensor:
        """``head(A + s)`` for a shift s (B, C) at every position, exact: with s only the query moves (every token
        moves by s too, which adds the same W_k s term to every key's score, cancelled by the softmax, and W_v s to
        the output, the probabilities summing to 1). Keys and values are formed once, from the unshifted tokens, so
        forward mode in s carries per head only (N,) scores and (d,) outputs: the Jacobian route's cheap head."""
        t = tokens(feats.maps[0])
        b, _, c = t.shape
        heads = ap.num_heads
        q = (F.linear(t[:, 0] + s, ap.q_proj.weight, ap.q_proj.bias) * (c // heads) ** -0.5).unflatten(-1, (heads, -1))
        k = F.linear(t, ap.k_proj.weight).unflatten(-1, (heads, -1))  # (B, N, heads, d); the bias cancels
        v = F.linear(t, ap.v_proj.weight, ap.v_proj.bias).unflatten(-1, (heads, -1))
        # one (N,) and one (d,) product per image and head, each an F.linear with an unbatched weight: a vmap over
        # the shift's directions folds them into rows (see pooled_attention)
        out = torch.stack([torch.cat([F.linear(F.linear(q[i, h], k[i, :, h]).softmax(dim=-1), v[i, :, h].T)
                                      for h in range(heads)]) for i in range(b)])
        return ap.c_proj(out + F.linear(s, ap.v_proj.weight))

    return extract, head, ("layer4",), shifted


def _vit_head(feats: Features, attend: Callable, finish: Callable, shift: Tensor | None = None) -> Tensor:
    """The CLS token through the rest of a pre-norm block: feats = (normed patch tokens (B, C, h, w),), (the CLS
    token's residual input (B, C), its normed token (B, 1, C)); attend(query, tokens, shift) -> (B, C) the attention
    output; shift (B, C): added to every patch token (``funcam.Split.shifted``)."""
    (fmap,), (t0, prefix) = feats.maps, feats.context
    tokens = torch.cat([prefix, rearrange(fmap, "b c h w -> b (h w) c")], dim=1)
    return finish(t0 + attend(prefix[:, 0], tokens, shift))


def _open_clip_vit_parts(v: nn.Module) -> tuple[Callable, Callable, tuple[str], Callable]:
    blocks = v.transformer.resblocks
    blk = blocks[-1]
    mha = blk.attn
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    heads = mha.num_heads
    lnd = not getattr(v.transformer, "batch_first", True)

    def extract(x: Tensor) -> Features:
        """x (B, 3, H, W) -> Features(maps=(ln_1 tokens (B, C, h, w),), context=(residual (B, C), CLS (B, 1, C)))."""
        f = v.conv1(x)
        gh, gw = f.shape[-2:]
        t = rearrange(f, "b c h w -> b (h w) c")
        t = torch.cat([v.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1), t], dim=1)
        t = v.ln_pre(v.patch_dropout(t + v.positional_embedding.to(t.dtype)))
        t = t.transpose(0, 1) if lnd else t
        for b in blocks[:-1]:
            t = b(t)
        t = t.transpose(0, 1) if lnd else t
        n = blk.ln_1(t)
        return Features((rearrange(n[:, 1:], "b (h w) c -> b c h w", h=gh, w=gw),), (t[:, 0], n[:, :1]))

    def attend(query: Tensor, tokens: Tensor, shift: Tensor | None) -> Tensor:
        c = query.shape[-1]
        return blk.ls_1(mha.out_proj(pooled_attention(query, tokens, (wq, bq, wk, bk, wv, bv), heads,
                                                      (c // heads) ** -0.5, shift)))

    def finish(x: Tensor) -> Tensor:
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x

    def head(feats: Features) -> Tensor:
        """Features -> the image embedding (B, D): the CLS token's path through the last block, ln_post, proj."""
        return _vit_head(feats, attend, finish)

    return extract, head, (f"transformer.resblocks.{len(blocks) - 1}.ln_1",), \
        lambda feats, s: _vit_head(feats, attend, finish, s)


def _hf_vit_parts(model: nn.Module) -> tuple[Callable, Callable, tuple[str], Callable]:
    vm = model.vision_model
    layers = vm.encoder.layers
    last = layers[-1]
    at = last.self_attn
    proj = (at.q_proj.weight, at.q_proj.bias, at.k_proj.weight, at.k_proj.bias, at.v_proj.weight, at.v_proj.bias)

    def extract(x: Tensor) -> Features:
        """x (B, 3, H, W) -> Features(maps=(layer_norm1 tokens (B, C, h, w),), context=(residual (B, C),
        CLS (B, 1, C)))."""
        patch = vm.embeddings.patch_size
        gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
        t = vm.pre_layrnorm(vm.embeddings(x))
        for layer in layers[:-1]:
            t = layer(t, None)
        n = last.layer_norm1(t)
        return Features((rearrange(n[:, 1:], "b (h w) c -> b c h w", h=gh, w=gw),), (t[:, 0], n[:, :1]))

    def attend(query: Tensor, tokens: Tensor, shift: Tensor | None) -> Tensor:
        return at.out_proj(pooled_attention(query, tokens, proj, at.num_heads, at.scale, shift))

    def finish(x: Tensor) -> Tensor:
        x = x + last.mlp(last.layer_norm2(x))
        return model.visual_projection(vm.post_layernorm(x))

    def head(feats: Features) -> Tensor:
        """Features -> the image embeddings (B, D) (``image_embeds``)."""
        return _vit_head(feats, attend, finish)

    return extract, head, (f"vision_model.encoder.layers.{len(layers) - 1}.layer_norm1",), \
        lambda feats, s: _vit_head(feats, attend, finish, s)


def _embedding(out: Any) -> Tensor:
    """The (B, D) embedding of a tower's own output (open_clip: the tensor; Hugging Face: ``image_embeds``)."""
    return getattr(out, "image_embeds", None) if not isinstance(out, Tensor) else out


def image_size(v: nn.Module) -> tuple[int, int]:
    """The input size a CLIP tower takes (its positional embeddings fix it)."""
    cfg = getattr(getattr(v, "config", None), "vision_config", None) or getattr(v, "config", None)
    size = getattr(cfg, "image_size", None) or getattr(v, "image_size", None) or 224
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]


def _confirm(sp: Split, module: nn.Module, v: nn.Module) -> None:
    """``head(extract(x)) == tower(x)`` on one random image at the tower's size; skipped in training mode (dropout)
    and inside a compiled region, where the checks on the modules stand alone."""
    if torch.compiler.is_compiling() or any(m.training for m in v.modules()):
        return
    p = next(v.parameters())
    h, w = image_size(v)
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(p)
    with torch.no_grad():
        want = _embedding(module(x))
        got = sp.head(sp.extract(x))
    tol = max(1e-4, 16 * torch.finfo(p.dtype).eps)
    if not isinstance(want, Tensor) or want.shape != got.shape or \
            not bool((want - got).abs().amax() <= tol * (1 + want.abs().amax())):
        raise ValueError(f"clip split: the split of {type(v).__name__} does not reproduce its image embedding on a "
                         f"random image; use funcam.split(model) (the graph route)")
