"""What the transformer-block routes share: fixed probes that check a block's form on its own weights, the
concatenation of prefix and patch tokens, and the Jacobian of a norm after a per-token MLP (Swin's shifted head)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def probe_tokens(c: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A fixed, irregular probe input (B, ..., C) in ``like``'s dtype and device."""
    n = math.prod(shape) * c
    t = torch.arange(n, dtype=torch.float64).mul(0.7).sin().mul(torch.arange(n, dtype=torch.float64).mul(1.3).cos())
    return t.reshape(*shape, c).mul(2).to(dtype=like.dtype, device=like.device)


def same_update(want: Tensor, got: Tensor, t: Tensor) -> bool:
    """Whether a block's output ``want`` and a formula's ``got`` update the block input ``t`` the same way, up to
    the rounding of the dtype (the fused and explicit attention round differently), relative to the size of the
    update: layer scales of 1e-5 make every update tiny, and a formula of another form is off by O(1) of it."""
    if want.shape != got.shape:
        return False
    tol = max(1e-4, 16 * torch.finfo(want.dtype).eps)
    update = (want - t).abs().amax()
    return bool((want - got).abs().amax() <= tol * update + torch.finfo(want.dtype).tiny)


def cat_prefix(prefix: Tensor, patches: Tensor) -> Tensor:
    return torch.cat([prefix, patches], dim=1) if prefix.shape[1] else patches


def agrees(got: Tensor, want: Tensor) -> bool:
    """The probes' test: the same shape and equal up to 1e-4 (or 16 eps of the dtype) of ``want``'s largest value."""
    tol = max(1e-4, 16 * torch.finfo(want.dtype).eps)
    return want.shape == got.shape and bool((want - got).abs().amax() <= tol * want.abs().amax())


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
