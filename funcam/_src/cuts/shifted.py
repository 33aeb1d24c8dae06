"""Shifted heads (``funcam.Split.shifted``): the head with a shift ``s (B, C)`` added at every position of the
feature, written so that Grad-CAM's Jacobian in ``s`` (``funcam._src.core.engine._shift_jacobian_maps``) is cheap.
For a Swin cut before the last per-token MLP (linearised at ``s = 0``): one (C, C) matrix per image instead of a
pass over every token per direction. For a timm ConvMlp head (VGG; exact for any ``s``): one (D, C) product instead
of fc1's convolution per direction and image.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from funcam._src.base import Features


def norm_mlp_jacobian(mlp: nn.Module, norm: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """f: (B, N, C) the MLP's input tokens, y: (B, N, C) the norm's input ``t + mlp(f)`` -> P (B, C, C), the
    Jacobian at ``s = 0`` of ``mean_j norm(t_j + mlp(f_j + s))`` in s.

    With M_j = W2 diag(d_j) W1, d_j = act'(fc1(f_j)) (``act`` elementwise), and for a LayerNorm
    LN(y) = gamma * (y - mu) / sigma + beta over C (sigma = sqrt(biased var + eps), yhat = (y - mu) / sigma; Ba et al.
    2016, eq. 4), J_LN(y) = diag(gamma) / sigma (I - 1 1^T / C - yhat yhat^T / C), so

        P = (1/N) sum_j J_LN(y_j) M_j
          = (1/N) diag(gamma) [ W2 diag(e) W1 - (1/C) 1 1^T W2 diag(e) W1
                                - (1/C) sum_j (yhat_j / sigma_j) ((yhat_j^T W2) * d_j) W1 ],  e = sum_j d_j / sigma_j.

    sigma_j is one number per token, so the sum over tokens is taken before the (C, 4C) x (4C, C) product: one per
    image, plus an (N, 4C) x (4C, C) one for the last term. An ``nn.Identity`` norm has J = I: P = (1/N) W2 diag(sum_j
    d_j) W1.
    """
    u = mlp.fc1(f)
    # act' at every hidden unit and token (one jvp of the elementwise activation with unit tangents)
    _, d = torch.func.jvp(mlp.act, (u,), (torch.ones_like(u),))  # (B, N, 4C)
    w1, w2 = mlp.fc1.weight, mlp.fc2.weight  # (4C, C), (C, 4C)
    n, c = f.shape[1], f.shape[2]
    if isinstance(norm, nn.Identity):
        return (w2 * d.sum(dim=1)[:, None, :]) @ w1 / n
    mu = y.mean(dim=-1, keepdim=True)
    sigma = (y.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # (B, N, 1)
    yhat = (y - mu) / sigma
    m = (w2 * (d / sigma).sum(dim=1)[:, None, :]) @ w1  # W2 diag(e) W1: (B, C, C)
    rows = ((yhat @ w2) * d) @ w1  # (yhat_j^T W2) * d_j then W1, per token: (B, N, C)
    # (1/C) 1 1^T m is m's column means on every row
    p = m - m.mean(dim=1, keepdim=True) - torch.einsum("bnc,bnd->bcd", yhat / sigma, rows) / c
    if norm.weight is not None:
        p = norm.weight[:, None] * p
    return p / n


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
    return _agrees(got, want) and _agrees(alone, act)


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
    return _agrees(got, want)


def _agrees(got: Tensor, want: Tensor) -> bool:
    """The probes' test: the same shape and equal up to 1e-4 (or 16 eps of the dtype) of ``want``'s largest value."""
    tol = max(1e-4, 16 * torch.finfo(want.dtype).eps)
    return want.shape == got.shape and bool((want - got).abs().amax() <= tol * want.abs().amax())
