"""The one loop oracle of the test suite: every CAM rule written out by hand, and plain autograd loops that give
the per-class gradients funcam's engine must reproduce. Nothing here calls funcam's engine or rules.

* ``rule(method, g, a)``: a gradient and a feature map -> the raw (pre-ReLU) map, each method's formula.
* ``hooked_loop(...)``: per image, one forward of the unmodified *model* with forward hooks, one
  ``torch.autograd.grad`` per class (independent of ``funcam.split``).
* ``cut_loop(sp, x, score)`` / ``loop_cams(sp, x, score, method)``: the same on a split's own cut, one
  ``autograd.grad`` of ``score(sp.head(...))[:, k]`` per score column, context held constant as funcam does.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from funcam import Features


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


def hooked_forward(model: nn.Module, modules: list[nn.Module], x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """model(x) with each module's output recorded (a clone goes on, so later in-place ops cannot touch it)."""
    outs: list[Tensor] = []

    def hook(mod, inp, out):
        outs.append(out)
        return out.clone()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == len(modules), "a hooked module ran more or less than once"
    return logits, outs


def hooked_loop(model: nn.Module, x: Tensor, scores: Callable[[int, Tensor], Tensor],
                feature: Callable[[nn.Module, Tensor], tuple[Tensor, list[Tensor]]],
                to_map: Callable[[Tensor, Tensor], Tensor]) -> tuple[list[list[Tensor]], list[list[list[Tensor]]]]:
    """For each image b alone: logits, feature tensors = feature(model, x[b:b+1]); for each score k,
    torch.autograd.grad(scores(b, logits)[k], features). Returns A[b][layer] (C, h, w) and
    G[b][k][layer] (C, h, w), converted to maps by to_map(tensor, x_b)."""
    a_all, g_all = [], []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        logits, feats = feature(model, xb)
        s = scores(b, logits)
        a_all.append([to_map(f.detach(), xb) for f in feats])
        g_b = []
        for k in range(s.shape[0]):
            grads = torch.autograd.grad(s[k], feats, retain_graph=True)
            g_b.append([to_map(g, xb) for g in grads])
        g_all.append(g_b)
    return a_all, g_all


def cut_loop(sp: Any, x: Tensor, score: Callable[[Any], Tensor]) -> tuple[Tensor, Tensor]:
    """The map A (B, C, h, w) that ``sp.extract`` gives and, per score column k, ``autograd.grad`` of
    ``score(sp.head(...))[:, k]`` w.r.t. A: (B, K, C, h, w). Context is held constant, as funcam does."""
    with torch.no_grad():
        feats = sp.extract(x)
    if isinstance(feats, Tensor):
        a = feats.detach().requires_grad_()
        rebuild: Callable[[Tensor], Any] = lambda m: m  # noqa: E731
    else:
        assert isinstance(feats, Features) and len(feats.maps) == 1
        a = feats.maps[0].detach().requires_grad_()
        rebuild = lambda m: Features((m,), feats.context, feats.chained)  # noqa: E731
    with torch.enable_grad():
        s = score(sp.head(rebuild(a)))
        grads = [torch.autograd.grad(s[:, k].sum(), a, retain_graph=True)[0] for k in range(s.shape[1])]
    return a.detach(), torch.stack(grads, dim=1)


def loop_cams(sp: Any, x: Tensor, score: Callable[[Any], Tensor], method: str, relu: bool = False) -> Tensor:
    """Raw maps (B, K, h, w) of ``method`` on the split's cut, from ``cut_loop``'s per-class gradients."""
    a, g = cut_loop(sp, x, score)
    maps = rule(method, g, a[:, None])
    return maps.clamp_min(0) if relu else maps
