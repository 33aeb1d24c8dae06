"""The one oracle module of the test suite: every rule written out by hand, the forwards that expose a value without
funcam, and the plain autograd loop whose per-class gradients funcam's engine must reproduce. Nothing here calls
funcam's engine, rules, cuts or rollout.

Rules (formulas on tensors):
* ``rule(method, g, a)``: a gradient and a feature map -> the raw (pre-ReLU) CAM, each method's formula;
  ``abs_terms(method, g, a)``: the summed |terms| of the stable rules (the scale rounding is relative to).
* ``mix``, ``roll``, ``rollout_loop``, ``relevance_matrix``: attention rollout, grad rollout and Chefer et al.'s
  relevance as matrix products.
* ``tokens(prefix, gh, gw)``, ``nhwc``, ``nchw``: a cut's value -> (B, C, h, w), written from what a family is.

Forwards (the model's own computation, a value exposed):
* ``hooked_forward``: forward hooks on modules; ``timm_features``: timm's ``forward_features`` / ``forward_head``;
  ``hand_vit_forward``: a timm ViT with every attention written out; ``AttentionTaps``: any model's forward with
  every attention computed explicitly (and optionally tapped).

The loop: ``class_grads(forward, x, score)``, one ``torch.autograd.grad`` per score column. Built on it:
``hook_grads`` / ``features_grads`` / ``cut_loop`` (a batch at once), ``hooked_loop`` and ``relevance_loop``
(image by image), ``attention_grads``, ``input_grads``, ``loop_cams``.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from funcam import Features

# ---------------------------------------------------------------------------------------------------------------------
# CAM rules
# ---------------------------------------------------------------------------------------------------------------------


def rule(method: str, g: Tensor, a: Tensor) -> Tensor:
    """Gradient g and feature a, both (..., C, h, w) (a broadcast against g) -> raw map (..., h, w)."""
    a = a.expand_as(g)
    if method == "gradcam":  # Selvaraju et al. 2017 eq. 1: alpha_c = 1/Z sum_ij dy/dA_cij
        w = g.mean(dim=(-2, -1), keepdim=True)
        return (w * a).sum(dim=-3)
    if method == "gradcam_max":
        w = g.flatten(-2).amax(dim=-1)[..., None, None]
        return (w * a).sum(dim=-3)
    if method == "gradcampp":  # Chattopadhyay et al. 2018 eq. 19, pytorch-grad-cam's eps and g == 0 rule
        sum_a = a.sum(dim=(-2, -1), keepdim=True)
        alpha = g ** 2 / (2 * g ** 2 + sum_a * g ** 3 + 1e-6)
        alpha = torch.where(g == 0, torch.zeros_like(alpha), alpha)
        w = (g.clamp_min(0) * alpha).sum(dim=(-2, -1), keepdim=True)
        return (w * a).sum(dim=-3)
    if method == "xgradcam":  # Fu et al. 2020: alpha_c = sum_ij (A_cij / sum_kl A_ckl) dy/dA_cij
        w = (g * a).sum(dim=(-2, -1), keepdim=True) / (a.sum(dim=(-2, -1), keepdim=True) + 1e-7)
        return (w * a).sum(dim=-3)
    if method == "hirescam":  # Draelos & Carin 2020: sum_c dy/dA_c * A_c
        return (g * a).sum(dim=-3)
    if method == "elementwise":  # pytorch-grad-cam's GradCAMElementWise: sum_c relu(dy/dA_c * A_c)
        return (g * a).clamp_min(0).sum(dim=-3)
    if method == "layercam":  # Jiang et al. 2021: sum_c relu(dy/dA_c) * A_c
        return (g.clamp_min(0) * a).sum(dim=-3)
    if method == "argmax_channel":  # the channel with the largest Grad-CAM weight, as it is
        c = g.mean(dim=(-2, -1)).argmax(dim=-1)
        return torch.gather(a, -3, c[..., None, None, None].expand(*a.shape[:-3], 1, *a.shape[-2:]))[..., 0, :, :]
    raise AssertionError(f"no oracle for {method}")


def abs_terms(method: str, g: Tensor, a: Tensor) -> Tensor:
    """sum_c |term_c| of a stable method's map, g and a (C, h, w) -> (h, w): the scale its rounding is relative to
    (maps are channel sums that can cancel by 1e6 and more)."""
    if method in ("gradcam", "gradcam_max"):
        wt = g.mean(dim=(1, 2)) if method == "gradcam" else g.flatten(1).amax(dim=1)
        return (wt[:, None, None] * a).abs().sum(0)
    return (g * a).abs().sum(0)  # hirescam, layercam, elementwise: element-wise products


# ---------------------------------------------------------------------------------------------------------------------
# Attention rollout (Abnar & Zuidema 2020), grad rollout and Chefer et al. 2021's relevance, as matrix products
# ---------------------------------------------------------------------------------------------------------------------


def mix(a: Tensor) -> Tensor:
    """(..., N, N) -> (A + I) / 2 with rows normalised (Abnar & Zuidema 2020, sec. 3: the residual as identity)."""
    m = (a + torch.eye(a.shape[-1], dtype=a.dtype)) / 2
    return m / m.sum(dim=-1, keepdim=True)


def roll(mats: list[Tensor], chefer: bool = False) -> Tensor:
    """Per-block matrices (..., N, N), first block first -> R (..., N, N): rollout R = M_L ... M_1, or Chefer et al.
    2021 eq. 13-14: R = I, R <- R + M_l R in forward order."""
    r = torch.eye(mats[0].shape[-1], dtype=mats[0].dtype).expand_as(mats[0])
    for m in mats:
        r = r + m @ r if chefer else m @ r
    return r


def relevance_matrix(attns: list[Tensor], grads: list[Tensor], rule: str) -> Tensor:
    """Attention probabilities and the gradient of one score at them, per block (..., heads, N, N) -> R (..., N, N).
    grad_rollout: roll(mix(E_h[(grad * A)^+])); chefer (Chefer et al. 2021 eq. 13): R += E_h[(grad * A)^+] R."""
    if rule == "grad_rollout":
        return roll([mix((g * a).mean(dim=-3).clamp(min=0)) for a, g in zip(attns, grads)])
    assert rule == "chefer", rule
    return roll([(g * a).clamp(min=0).mean(dim=-3) for a, g in zip(attns, grads)], chefer=True)


def rollout_loop(attns: list[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                 start: int = 0) -> Tensor:
    """The vit-explain recipe, looped over images, blocks and heads: attentions (B, heads, N, N) per block -> R
    (B, N, N). Heads fused by mean / max / min, then the lowest ``discard_ratio`` of the N*N entries zeroed (the
    CLS->CLS entry, flat index 0, never), then ``mix``; blocks before ``start`` left out."""
    b_, _, n, _ = attns[0].shape
    out = []
    for b in range(b_):
        r = torch.eye(n, dtype=attns[0].dtype)
        for a_l in attns[start:]:
            heads = [a_l[b, h] for h in range(a_l.shape[1])]
            if head_fusion == "mean":
                a = sum(heads) / len(heads)
            elif head_fusion == "max":
                a = torch.stack(heads).max(dim=0).values
            else:
                a = torch.stack(heads).min(dim=0).values
            flat = a.flatten().clone()
            k = int(n * n * discard_ratio)
            if k:
                low = flat.argsort()[:k]
                flat[low[low != 0]] = 0
            r = mix(flat.reshape(n, n)) @ r  # block l acts after the blocks before it
        out.append(r)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts, written from knowledge of a family
# ---------------------------------------------------------------------------------------------------------------------


def tokens(prefix: int, gh: int, gw: int) -> Callable[[Tensor], Tensor]:
    """(B, prefix + gh*gw, C) tokens, prefix tokens first, patches row-major -> (B, C, gh, gw)."""
    return lambda t: rearrange(t[:, prefix:], "b (h w) c -> b c h w", h=gh, w=gw)


def nhwc(t: Tensor) -> Tensor:
    """(B, h, w, C) channels-last -> (B, C, h, w)."""
    return rearrange(t, "b h w c -> b c h w")


def nchw(t: Tensor) -> Tensor:
    """(B, C, h, w) as it is."""
    assert t.ndim == 4
    return t


# ---------------------------------------------------------------------------------------------------------------------
# Forwards that expose a value
# ---------------------------------------------------------------------------------------------------------------------


def logits_of(out: Any) -> Tensor:
    """The classifier logits of a model's output (a tensor, or a Hugging Face ModelOutput's ``logits``)."""
    return out if isinstance(out, Tensor) else out.logits


def hooked_forward(model: nn.Module, modules: list[nn.Module], x: Tensor) -> tuple[Any, list[Tensor]]:
    """model(x) with each module's output recorded, in the order the modules ran: a tensor output (a clone goes on,
    so later in-place ops cannot touch it), or the first element of a tuple / ModelOutput (a Hugging Face encoder)."""
    outs: list[Tensor] = []

    def hook(mod, inp, out):
        if isinstance(out, Tensor):
            outs.append(out)
            return out.clone()
        outs.append(out[0])
        return None

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == len(modules), "a hooked module ran more or less than once"
    return logits, outs


def timm_features(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """timm's public contract ``forward_head(forward_features(x))``: (logits (B, N), [features, a leaf])."""
    f = model.forward_features(x).detach().requires_grad_()
    return model.forward_head(f), [f]


def hand_vit_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """timm's ViT forward with every attention written out from the qkv weights (Vaswani et al. 2017, eq. 1):
    (logits (B, N), [A (B, heads, N, N) per block])."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    attns = []
    for blk in model.blocks:
        at = blk.attn
        h = blk.norm1(t)
        b, n, _ = h.shape
        nh, d = at.num_heads, at.head_dim
        qkv = h @ at.qkv.weight.T
        if at.qkv.bias is not None:
            qkv = qkv + at.qkv.bias
        q, k, v = (qkv[..., i * nh * d:(i + 1) * nh * d].reshape(b, n, nh, d).transpose(1, 2) for i in range(3))
        q, k = at.q_norm(q), at.k_norm(k)
        a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        attns.append(a)
        o = (a @ v).transpose(1, 2).reshape(b, n, nh * d)
        t = t + blk.ls1(at.proj(o))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)), attns


class AttentionTaps(TorchFunctionMode):
    """Runs the model's own forward with each attention computed explicitly (Vaswani et al. 2017, eq. 1) and records
    its probabilities (B, heads, N, N), optionally plus a zero-valued tap ``deltas[i]`` whose gradient is the gradient
    at the probabilities. Intercepts ``F.scaled_dot_product_attention`` (timm, Hugging Face sdpa),
    ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: torchvision) and explicit softmaxes over N x N.
    Inside the handler the mode is off, so the explicit ops are not intercepted again."""

    def __init__(self, deltas: list[Tensor] | None = None):
        super().__init__()
        self.deltas, self.probs = deltas, []

    def _tap(self, p: Tensor) -> Tensor:
        if self.deltas is not None:
            p = p + self.deltas[len(self.probs)]
        self.probs.append(p)
        return p

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            assert not kwargs.get("is_causal") and not kwargs.get("dropout_p")
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            s = q @ k.transpose(-2, -1) * scale
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
            return self._tap(s.softmax(dim=-1)) @ v
        if func is F.multi_head_attention_forward:
            query, key, value, _, heads, w_in, b_in = args[:7]
            w_out, b_out = args[11], args[12]
            assert query is key is value and args[7] is None and not kwargs.get("attn_mask")
            qkv = F.linear(query, w_in, b_in)  # (L, B, 3E)
            q, k, v = (rearrange(t, "l b (h d) -> b h l d", h=heads) for t in qkv.chunk(3, dim=-1))
            p = self._tap((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))
            return F.linear(rearrange(p @ v, "b h l d -> l b (h d)"), w_out, b_out), None
        if func in (F.softmax, torch.softmax, Tensor.softmax):
            t = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if t.ndim == 4 and t.shape[-1] == t.shape[-2] and dim in (-1, 3):
                return self._tap(torch.softmax(t, dim=-1))  # in t's dtype (Hugging Face eager asks float32)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# The autograd loop, and the oracles built on it
# ---------------------------------------------------------------------------------------------------------------------


def class_grads(forward: Callable[[Tensor], tuple[Any, list[Tensor]]], x: Tensor, score: Callable[[Any], Tensor],
                create_graph: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """The one loop. ``forward(x)`` -> (output, [values (B, ...) on the autograd graph]); ``score(output)`` -> (B, K).
    For each score column k, ``torch.autograd.grad(score[:, k].sum(), values)`` (images are independent, so each
    image gets its own gradient). Returns the values (detached, or kept on the graph with ``create_graph``) and per
    value the gradients stacked (B, K, ...)."""
    with torch.enable_grad():
        out, values = forward(x)
        s = score(out)
        per_k = [torch.autograd.grad(s[:, k].sum(), values, retain_graph=True, create_graph=create_graph)
                 for k in range(s.shape[1])]
    grads = [torch.stack([g[i] for g in per_k], dim=1) for i in range(len(values))]
    return [v if create_graph else v.detach() for v in values], grads


def _maps_of(to_map: Callable[[Tensor], Tensor], a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """A value (B, ...) and its gradients (B, K, ...) -> (B, C, h, w), (B, K, C, h, w) through ``to_map``."""
    return to_map(a), torch.stack([to_map(g[:, k]) for k in range(g.shape[1])], dim=1)


def hook_grads(model: nn.Module, x: Tensor, layer: str, to_map: Callable[[Tensor], Tensor],
               score: Callable[[Any], Tensor], create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """The unmodified model with a forward hook on the submodule ``layer``: its output A (B, C, h, w) and the gradient
    of each score column at it G (B, K, C, h, w), both turned into maps by ``to_map``. With ``create_graph`` both stay
    differentiable w.r.t. the parameters (double backward; attention written out by ``AttentionTaps``, since the fused
    kernel has no double backward)."""
    module = model.get_submodule(layer)

    def forward(t):
        if create_graph:
            with AttentionTaps():
                return hooked_forward(model, [module], t)
        return hooked_forward(model, [module], t)

    (a,), (g,) = class_grads(forward, x, score, create_graph=create_graph)
    return _maps_of(to_map, a, g)


def features_grads(model: nn.Module, x: Tensor, to_map: Callable[[Tensor], Tensor],
                   classes: list[int]) -> tuple[Tensor, Tensor]:
    """``timm_features`` (checked against ``model(x)``): A (B, C, h, w), G (B, K, C, h, w) of the logits of
    ``classes``, the feature turned into (B, C, h, w) by ``to_map``."""
    torch.testing.assert_close(timm_features(model, x)[0], model(x), rtol=0, atol=1e-12)
    (a,), (g,) = class_grads(lambda t: timm_features(model, t), x, lambda lg: lg[:, classes])
    return _maps_of(to_map, a, g)


def cut_loop(sp: Any, x: Tensor, score: Callable[[Any], Tensor]) -> tuple[Tensor, Tensor]:
    """The map A (B, C, h, w) that ``sp.extract`` gives and, per score column k, the gradient of
    ``score(sp.head(...))[:, k]`` w.r.t. A: (B, K, C, h, w). Context is held constant, as funcam does."""
    with torch.no_grad():
        feats = sp.extract(x)
    if isinstance(feats, Tensor):
        a = feats.detach().requires_grad_()
        rebuild: Callable[[Tensor], Any] = lambda m: m
    else:
        assert isinstance(feats, Features) and len(feats.maps) == 1
        a = feats.maps[0].detach().requires_grad_()
        rebuild = lambda m: Features((m,), feats.context, feats.chained)
    (a,), (g,) = class_grads(lambda _: (sp.head(rebuild(a)), [a]), x, score)
    return a, g


def loop_cams(sp: Any, x: Tensor, score: Callable[[Any], Tensor], method: str, relu: bool = False) -> Tensor:
    """Raw maps (B, K, h, w) of ``method`` on the split's cut, from ``cut_loop``'s per-class gradients."""
    a, g = cut_loop(sp, x, score)
    maps = rule(method, g, a[:, None])
    return maps.clamp_min(0) if relu else maps


def hooked_loop(model: nn.Module, x: Tensor, scores: Callable[[int, Tensor], Tensor],
                feature: Callable[[nn.Module, Tensor], tuple[Tensor, list[Tensor]]],
                to_map: Callable[[Tensor, Tensor], Tensor]) -> tuple[list[list[Tensor]], list[list[list[Tensor]]]]:
    """Image by image: for x[b:b+1], ``feature(model, xb)`` -> (logits, [values]), and ``class_grads`` of the (K,)
    scores ``scores(b, logits)``. Returns A[b][value] and G[b][k][value], each turned into (C, h, w) by
    ``to_map(tensor (1, ...), xb)``."""
    a_all, g_all = [], []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        values, grads = class_grads(lambda t: feature(model, t), xb, lambda lg, b=b: scores(b, lg)[None])
        a_all.append([to_map(v, xb) for v in values])
        g_all.append([[to_map(g[:, k], xb) for g in grads] for k in range(grads[0].shape[1])])
    return a_all, g_all


def attention_grads(model: nn.Module, x: Tensor, classes: list[int]) -> tuple[list[Tensor], list[list[Tensor]]]:
    """``AttentionTaps`` on the model's own forward: (probabilities per block (B, heads, N, N), per class: the
    gradient of that logit at each block's probabilities)."""
    with torch.no_grad(), AttentionTaps() as rec:
        model(x)
    probs = [p.detach() for p in rec.probs]
    deltas = [torch.zeros_like(p, requires_grad=True) for p in probs]

    def forward(t):
        with AttentionTaps(deltas) as taps:
            out = model(t)
        assert len(taps.probs) == len(probs)
        return out, deltas

    _, grads = class_grads(forward, x, lambda out: logits_of(out)[:, classes])
    return probs, [[g[:, k] for g in grads] for k in range(len(classes))]


def relevance_loop(model: nn.Module, x: Tensor, classes: Tensor, rule: str) -> Tensor:
    """Image by image, for a timm ViT: ``hand_vit_forward``, the gradient of each of the image's classes (B, K) at
    its attentions, then ``relevance_matrix``. Returns the CLS rows of R (B, K, N)."""
    out = []
    for b in range(x.shape[0]):
        attns, grads = class_grads(lambda t: hand_vit_forward(model, t), x[b:b + 1],
                                   lambda lg, b=b: lg[:, classes[b]])
        out.append(torch.stack([relevance_matrix([a[0] for a in attns], [g[0, k] for g in grads], rule)[0]
                                for k in range(classes.shape[1])]))
    return torch.stack(out)


def input_grads(model: nn.Module, x: Tensor, score: Callable[[Any], Tensor]) -> Tensor:
    """The plain gradient of each score column w.r.t. the input (vanilla saliency): (B, K, C, H, W)."""
    _, (g,) = class_grads(lambda t: (model(t), [t]), x.detach().clone().requires_grad_(), score)
    return g


# --- lxt 2.1, as a peer -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lxt_efficient():
    """lxt.efficient's modules without its package __init__ (which imports lxt's BERT copy, broken on transformers 5);
    the stub packages and every lxt.efficient module loaded are removed afterwards."""
    import lxt

    root = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    before = set(sys.modules)
    for name, path in (("lxt.efficient", root), ("lxt.efficient.models", os.path.join(root, "models"))):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


@contextlib.contextmanager
def patched(patch_map: dict, attrs: dict = ()):
    """lxt's class patches (``patch_map``: class -> lxt patch function, as ``lxt.efficient.monkey_patch`` applies them)
    and module attributes (``attrs``: (module, name) -> value), undone afterwards: lxt patches classes globally."""
    saved = {c: {k: vars(c)[k] for k in ("forward", "original_forward") if k in vars(c)} for c in patch_map}
    old = {key: getattr(*key) for key in dict(attrs)}
    try:
        for target, patch in patch_map.items():
            assert patch(target)
        for (mod, name), value in dict(attrs).items():
            setattr(mod, name, value)
        yield
    finally:
        for c, d in saved.items():
            for k in ("forward", "original_forward"):
                if k in d:
                    setattr(c, k, d[k])
                elif k in vars(c):
                    delattr(c, k)
        for (mod, name), value in old.items():
            setattr(mod, name, value)
