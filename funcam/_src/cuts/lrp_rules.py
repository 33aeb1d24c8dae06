"""LRP rules as ordinary functions: each computes its op's value unchanged and changes only its gradient.

The Gradient x Input formulation of LRP (Achtibat et al., "AttnLRP", ICML 2024, sec. 3.4 and appendix A.2.1):
the relevance of a value ``v`` is ``R(v) = v * g(v)``, with ``g`` the modified gradient arriving at ``v``. A rule
that maps ``R(y)`` to ``R(x)`` for ``y = f(x)`` is then the gradient rule ``g(x) = R(x) / x``, and relevance for a
class is one backward pass: ``R(input) = input * g(input)``. The rules are written with stop-gradient identities
(``v.detach() + c * (w - w.detach())`` has the value ``v`` and sends ``c * g`` through ``w``), so a forward built from
them is an ordinary function: ``torch.func.vjp`` and ``vmap`` over K one-hot cotangents apply, with no hooks and no
custom autograd Function. Every ``c`` below is a constant of the forward (detached).

A conv or linear layer is given as ``op, rest``: ``op(x, w, b, *rest)`` is the layer (an ATen op such as
``aten.conv2d`` with its stride, padding, ... in ``rest``), which a rewritten graph can carry as constants. The
zennit rules (Epsilon, ZPlus, AlphaBeta, Gamma,
ZBox, Flat, Norm) follow ``zennit.rules`` 0.5 term by term, with its stabiliser ``z + eps * sign(z)``, sign(0) = 1.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from funcam._src.cuts.attention import masked_softmax


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with sign(0) = +1: the denominator of LRP-epsilon (Bach et al. 2015, eq. 58), as
    ``zennit.core.stabilize``; it never divides by zero and keeps the sign."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def scale_grad(v: Tensor, c: Any) -> Tensor:
    """The value ``v``, the gradient ``c * g`` (``c`` a constant tensor or number)."""
    return v.detach() + through(v, c)


def rewire(y: Tensor, z: Tensor, c: Tensor) -> Tensor:
    """The value ``y``; the gradient ``c * g`` sent through ``z`` instead of through ``y``."""
    return y.detach() + through(z, c)


def through(z: Tensor, c: Any) -> Tensor:
    """Zero in value, the gradient ``c * g`` sent through ``z``. An infinite ``c`` (a ratio that overflows, as
    float16's do above 65504) is held at the dtype's largest finite number: ``inf * 0`` would make the forward's
    value NaN, while the rules change gradients only."""
    if isinstance(c, Tensor):
        c = torch.nan_to_num(c.detach())
    return c * (z - z.detach())


def _pos(x: Tensor) -> Tensor:
    # x * mask rather than clamp: the gradient is exactly 1 where x > 0 and 0 elsewhere, at x = 0 too
    return x * (x > 0).to(x.dtype)


def _neg(x: Tensor) -> Tensor:
    return x * (x < 0).to(x.dtype)


def _value(lin: Callable, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``lin(x, w, b)`` without an autograd graph: the rules read it as a constant."""
    return lin(x.detach(), w.detach(), None if b is None else b.detach())


def _lin(op: Callable, rest: Sequence[Any]) -> Callable:
    return lambda x, w, b: op(x, w, b, *rest)


# --- AttnLRP (Achtibat et al. 2024) ----------------------------------------------------------------------------------

def identity_rule(y: Tensor, x: Tensor, eps: float = 1e-10) -> Tensor:
    """The identity rule for an element-wise ``y = act(x)`` (AttnLRP eq. 9: ``R(x) = R(y)``): the gradient
    ``(y / x) * g``; lxt's implicit ratio ``act(x) / (x + 1e-10)``, with the stabiliser's sign following x's so that
    the ratio stays finite for tiny negative x. Also zennit's ``Pass`` rule at activations."""
    # 1e-10 underflows to 0 in float16: the smallest normal number of the dtype at least
    eps = max(eps, torch.finfo(x.dtype).tiny)
    return rewire(y, x, y.detach() / stabilize(x.detach(), eps))


def uniform(v: Tensor, n: int) -> Tensor:
    """The uniform rule's share for one of ``n`` input-dependent factors of a product (AttnLRP eq. 7, the matmuls
    of attention and gated units): the gradient ``g / n``."""
    return scale_grad(v, 1.0 / n)


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *_: Any) -> Tensor:
    """LayerNorm with its standard deviation held constant, the mean keeping its gradient (AttnLRP sec. 3.3.2, the
    identity rule through normalisation; lxt's ``layer_norm_forward``). The value is the native kernel's, so that
    the rewritten forward overflows where the model's does (the written-out variance overflows to inf and gives 0
    where the kernel gives NaN)."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / (var + eps).sqrt().detach()
    if weight is not None:
        y = y * weight
    y = y if bias is None else y + bias
    value = F.layer_norm(x.detach(), tuple(normalized_shape), None if weight is None else weight.detach(),
                         None if bias is None else bias.detach(), eps)
    return value + (y - y.detach())


def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """RMSNorm with its root mean square held constant (lxt's ``rms_norm_forward``)."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps).detach()
    return y if weight is None else y * weight


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *_: Any) -> Tensor:
    """GroupNorm ``x (B, C, ...)`` with each group's standard deviation held constant (as ``layer_norm``)."""
    b, c = x.shape[:2]
    xg = x.reshape(b, num_groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) / (var + eps).sqrt().detach()).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def batch_norm_batch_stats(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch norm with batch statistics (a model in training mode): the standard deviation held constant."""
    dims = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / (var + eps).sqrt().detach()
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def batch_norm_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                      eps: float) -> Tensor:
    """Eval-mode batch norm as the affine map it is, ``(x - mean) * weight / sqrt(var + eps) + bias`` (its gradient
    is LRP-0's); written out so that the running mean, an additive term, has a gradient too (the fused kernel has
    none)."""
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    scale = torch.rsqrt(var + eps) if weight is None else weight * torch.rsqrt(var + eps)
    y = (x - mean.reshape(shape)) * scale.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def statistic_and_mean(op: Callable, over: Any, keep: bool, x: Tensor, *args: Any, **kwargs: Any) -> tuple:
    """``var_mean`` / ``std_mean`` (``op``) in a hand-written normalisation: the statistic held constant, the mean
    keeping its gradient, as in LayerNorm's rule."""
    stat, _ = op(x.detach(), *args, **kwargs)
    return stat, x.mean() if over is None else x.mean(dim=over, keepdim=keep)


def product(op: Callable, deps: Sequence[bool], *args: Any) -> Any:
    """``op(*args)`` for a product (mul, matmul, bmm, einsum's operands): with n > 1 input-dependent factors
    (``deps`` per tensor argument, in order), each gets ``1/n`` of the gradient (the uniform rule, AttnLRP eq. 7);
    with one, the product is linear in it and keeps its gradient."""
    n = sum(deps)
    if n < 2:
        return op(*args)
    it = iter(deps)

    def share(a: Any) -> Any:
        if isinstance(a, Tensor):
            return uniform(a, n) if next(it) else a
        if isinstance(a, (list, tuple)):
            return type(a)(share(e) for e in a)
        return a

    return op(*(share(a) for a in args))


def divide(a: Tensor, b: Any, *rest: Any) -> Tensor:
    """``a / b`` with an input-dependent divisor held constant: a division by an input-dependent value is a
    normalisation (``x / norm(x)``, a hand-written LayerNorm), where AttnLRP holds the normaliser constant."""
    return torch.div(a, b.detach() if isinstance(b, Tensor) else b, *rest)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
         deps: Sequence[bool] = (True, True, True), cp: bool = False) -> Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) written out with AttnLRP's rules: the uniform rule
    at both matmuls, the softmax by its gradient (AttnLRP sec. 3.3.1, which lxt's efficient mode implements as
    query and key gradients / 4 and value gradients / 2); ``cp``: CP-LRP (Ali et al., ICML 2022), the attention
    probabilities held constant. ``deps``: which of q, k, v depend on the input. Shapes as
    ``F.scaled_dot_product_attention``: q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    dq, dk, dv = deps
    if cp:
        q, k, dq, dk = q.detach(), k.detach(), False, False
    probs = masked_softmax(product(torch.matmul, (dq, dk), q * s, k.transpose(-2, -1)), attn_mask, is_causal)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return product(torch.matmul, (dq or dk, dv), probs, v)


# --- zennit's rules for conv and linear layers (Bach et al. 2015; Montavon et al. 2019) -------------------------------

def epsilon(y: Tensor, eps: float = 1e-6) -> Tensor:
    """LRP-epsilon for ``y = lin(x, w, b)`` computed by the caller (Bach et al. 2015, eq. 58; zennit ``Epsilon``,
    ``Norm`` at average pooling and sums): ``R(x) = x * lin^T(R(y) / stab(y))``, i.e. the gradient ``y / stab(y)``."""
    return scale_grad(y, y.detach() / stabilize(y.detach(), eps))


def zplus(op: Callable, rest: Sequence[Any], x: Tensor, w: Tensor, b: Tensor | None, *, nonneg: bool = False,
          eps: float = 1e-6) -> Tensor:
    """LRP z+ (Montavon et al. 2017; zennit ``ZPlus`` = alpha 1, beta 0): positive inputs through positive weights
    (with the positive bias), negative inputs through negative weights; ``nonneg``: x >= 0 is known (after a ReLU),
    so the second term is zero and skipped."""
    lin = _lin(op, rest)
    y = _value(lin, x, w, b)
    z = lin(_pos(x), w.clamp(min=0), None if b is None else b.clamp(min=0))
    if not nonneg:
        z = z + lin(_neg(x), w.clamp(max=0), None)
    return rewire(y, z, y / stabilize(z.detach(), eps))


def alpha_beta(op: Callable, rest: Sequence[Any], x: Tensor, w: Tensor, b: Tensor | None, *, alpha: float = 2.0,
               beta: float = 1.0, nonneg: bool = False, eps: float = 1e-6) -> Tensor:
    """LRP alpha-beta (Bach et al. 2015, eq. 60; zennit ``AlphaBeta``): ``alpha`` times the positive contributions'
    share minus ``beta`` times the negative ones'."""
    lin = _lin(op, rest)
    y = _value(lin, x, w, b)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp, bn = (None, None) if b is None else (b.clamp(min=0), b.clamp(max=0))
    za, zb = lin(_pos(x), wp, bp), lin(_pos(x), wn, bn)
    if not nonneg:
        za, zb = za + lin(_neg(x), wn, None), zb + lin(_neg(x), wp, None)
    ca = alpha * y / stabilize(za.detach(), eps)
    cb = beta * y / stabilize(zb.detach(), eps)
    return y + through(za, ca) - through(zb, cb)


def gamma_rule(op: Callable, rest: Sequence[Any], x: Tensor, w: Tensor, b: Tensor | None, *, gamma: float = 0.25,
               nonneg: bool = False, eps: float = 1e-6) -> Tensor:
    """Generalised LRP-gamma (Montavon et al. 2019, eq. 7; zennit ``Gamma``): where the output is positive the
    contributions ``x+ (w + gamma w+)`` and ``x- (w + gamma w-)``, where it is negative the opposite pairing."""
    lin = _lin(op, rest)
    y = _value(lin, x, w, b)
    wp, wn = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
    bp, bn = (None, None) if b is None else (b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0))
    zp, zq = lin(_pos(x), wp, bp), lin(_pos(x), wn, bn)
    if not nonneg:
        zp, zq = zp + lin(_neg(x), wn, None), zq + lin(_neg(x), wp, None)
    cp = _pos(y) / stabilize(zp.detach(), eps)
    cq = _neg(y) / stabilize(zq.detach(), eps)
    return y + through(zp, cp) + through(zq, cq)


def zbox(op: Callable, rest: Sequence[Any], x: Tensor, t: Tensor, w: Tensor, b: Tensor | None, low: Tensor,
         high: Tensor, *, eps: float = 1e-6) -> Tensor:
    """LRP z^B for the first layer on inputs within ``[low, high]`` (Montavon et al. 2017, eq. 9; zennit ``ZBox``).
    Its input relevance is not ``x`` times a gradient, so it goes to the zero tap ``t`` (shaped like ``x``):
    the gradient at ``t`` is the relevance itself; ``x`` gets none through this layer."""
    lin = _lin(op, rest)
    low, high = low.expand_as(x), high.expand_as(x)
    y = _value(lin, x, w, b)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = y - _value(lin, low, wp, None if b is None else b.clamp(min=0)) - _value(
        lin, high, wn, None if b is None else b.clamp(max=0))
    xd = x.detach()
    h = lin(t * xd, w, None) - lin(t * low, wp, None) - lin(t * high, wn, None)  # zero at t = 0
    return y + (y / stabilize(z, eps)) * h


def flat(op: Callable, rest: Sequence[Any], x: Tensor, t: Tensor, w: Tensor, b: Tensor | None, *,
         eps: float = 1e-6) -> Tensor:
    """LRP flat for the first layer (Lapuschkin et al. 2019; zennit ``Flat``): relevance spread uniformly over each
    output's receptive field, independent of x; to the zero tap ``t`` like ``zbox``."""
    lin = _lin(op, rest)
    y = _value(lin, x, w, b)
    ones = torch.ones_like(w)
    z = lin(torch.ones_like(x), ones, None)
    return y + (y / stabilize(z, eps)) * lin(t, ones, None)


def merge_batch_norm(w: Tensor, b: Tensor | None, bn_w: Tensor | None, bn_b: Tensor | None, mean: Tensor,
                     var: Tensor, eps: float, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """The weight and bias of ``batch_norm(lin(x, w, b))`` (eval mode) as one layer ``lin(x, w', b')``: zennit's
    canonizer (``MergeBatchNorm``); LRP's rules for conv / linear layers assume it (Montavon et al. 2019, 10.2)."""
    scale = torch.rsqrt(var + eps) if bn_w is None else bn_w * torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * (w.ndim - 2) if transposed else (-1,) + (1,) * (w.ndim - 1)
    bias = (-mean if b is None else b - mean) * scale
    return w * scale.reshape(shape), bias if bn_b is None else bias + bn_b


def to_one(y: Tensor) -> Tensor:
    """The gradient ``g / y``: with a one-hot cotangent the explained score's relevance ``y * g`` is 1 (zennit's
    convention) instead of the score itself (lxt's); a score of exactly 0 then starts no relevance."""
    yd = y.detach()
    return scale_grad(y, torch.where(yd != 0, 1 / torch.where(yd != 0, yd, 1.0), 0.0))
