"""Per-class rules: gradient ``g (B, C, h, w)`` and features ``A (B, C, h, w)`` -> map ``(B, h, w)``.

One function per method, each the paper's equation. They run inside ``vmap`` over classes, so they use
only batched-friendly tensor ops (no ``.item()``, no branches on values). ReLU is applied later, by the
caller, at feature resolution (``relu=False`` keeps signed maps).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

# pytorch-grad-cam's constants, so maps agree to float precision: eps of the Grad-CAM++ denominator
# (eq. 19) and of XGrad-CAM's normaliser.
GRADCAMPP_EPS = 1e-6
XGRADCAM_EPS = 1e-7


class Rule(NamedTuple):
    """A channel-weighting CAM's equation in the forms the engine can use (``funcam._src.core.engine.class_maps``).

    per_class: ``(g (B, C, h, w), A) -> map (B, h, w)``, run inside the vmap over classes.
    weights: when the map is ``sum_c w_c A_c``, ``(g, A) -> w (B, C)``; the maps then come from one batched product.
    pooled: the same equation for a spatially constant gradient, ``(v (B, K, C), A) -> (B, K, h, w)`` (heads that
        start with global average pooling).
    mean: the channel weights are the spatial mean of the gradient (Grad-CAM), which the engine may take from the
        head's Jacobian in a shift added at every position.
    """

    per_class: Callable[[Tensor, Tensor], Tensor]
    weights: Callable[[Tensor, Tensor], Tensor] | None = None
    pooled: Callable[[Tensor, Tensor], Tensor] | None = None
    mean: bool = False


def weighted_sum(w: Tensor, a: Tensor) -> Tensor:
    """sum_c w_c A_c: w (B, C), A (B, C, h, w) -> (B, h, w)."""
    return torch.einsum("bc,bchw->bhw", w, a)


def gradcam_weights(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017, eq. 1): w_c = mean_hw g; (B, C)."""
    return g.mean(dim=(2, 3))


def gradcam_max_weights(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM with max-pooled gradients (eq. 1 of Selvaraju et al. with max for the mean): w_c = max_hw g."""
    return g.amax(dim=(2, 3))


def gradcampp_weights(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential's higher-order terms):

    alpha = g^2 / (2 g^2 + (sum_hw A) g^3 + eps), alpha = 0 where g == 0; w_c = sum_hw relu(g) alpha.
    """
    alpha = _gradcampp_alpha(g, a.sum(dim=(2, 3), keepdim=True))
    return (torch.relu(g) * alpha).sum(dim=(2, 3))


def _gradcampp_alpha(g: Tensor, s: Tensor) -> Tensor:
    """alpha = g^2 / (2 g^2 + s g^3 + eps), 0 where g == 0 (s: sum_hw A, broadcast against g), in g's dtype.

    Differentiable without NaN: the denominator is 1 where g == 0 (a where selects 0 there anyway, and its backward
    would otherwise carry 0 / eps^2), and half-precision gradients are formed in float32, where eps^2 = 1e-12
    does not underflow to 0 as it does in float16 (where it made d maps / d x NaN)."""
    work = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    g, s, out = g.to(work), s.to(work), g.dtype
    g2 = g * g
    nonzero = g != 0
    denom = torch.where(nonzero, 2 * g2 + s * g2 * g + GRADCAMPP_EPS, torch.ones_like(g))
    return torch.where(nonzero, g2 / denom, torch.zeros_like(g)).to(out)


def xgradcam_weights(g: Tensor, a: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020, eq. 11): w_c = sum_hw g A / (sum_hw A + eps)."""
    return (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + XGRADCAM_EPS)


def gradcam(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM map (eq. 2 before the ReLU): sum_c w_c A_c with ``gradcam_weights``."""
    return weighted_sum(gradcam_weights(g, a), a)


def gradcam_max(g: Tensor, a: Tensor) -> Tensor:
    return weighted_sum(gradcam_max_weights(g, a), a)


def gradcampp(g: Tensor, a: Tensor) -> Tensor:
    return weighted_sum(gradcampp_weights(g, a), a)


def xgradcam(g: Tensor, a: Tensor) -> Tensor:
    return weighted_sum(xgradcam_weights(g, a), a)


def hirescam(g: Tensor, a: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin 2020, eq. 4): element-wise sum_c g * A (no spatial averaging)."""
    return (g * a).sum(dim=1)


def elementwise(g: Tensor, a: Tensor) -> Tensor:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): sum_c relu(g * A)."""
    return torch.relu(g * a).sum(dim=1)


def layercam(g: Tensor, a: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021, eq. 5-6): sum_c relu(g) * A."""
    return (torch.relu(g) * a).sum(dim=1)


def argmax_channel(g: Tensor, a: Tensor) -> Tensor:
    """The single feature channel with the largest Grad-CAM weight: A_{c*}, c* = argmax_c mean_hw g."""
    c = g.mean(dim=(2, 3)).argmax(dim=1)  # (B,)
    idx = c.view(-1, 1, 1, 1).expand(-1, 1, a.shape[2], a.shape[3])
    return a.gather(1, idx).squeeze(1)


# --- Spatially constant gradients -------------------------------------------------------------------------
# When the head starts with global average pooling (``funcam.Pooled``), g is constant over space:
# g[b, k, c, i, j] = v[b, k, c]. The same equations then reduce to channel weights on (B, K, C), and all
# K maps of an image come from one (K, C) x (C, h w) product: the (K, B, C, h, w) gradient never exists.
# Each rule: v (B, K, C), A (B, C, h, w) -> maps (B, K, h, w), equal to the per-class rule on the broadcast g
# (``funcam._src.core.methods.TABLE`` pairs them).

def channel_sum(w: Tensor, a: Tensor) -> Tensor:
    """sum_c w_kc A_c for all k at once: w (B, K, C), A (B, C, h, w) -> (B, K, h, w), one batched matmul."""
    b, c, h, wd = a.shape
    return torch.bmm(w, a.reshape(b, c, h * wd)).view(b, w.shape[1], h, wd)


def pooled_gradcampp(v: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM++ eq. 19 with g = v at all h w positions: w_c = h w relu(v) alpha."""
    alpha = _gradcampp_alpha(v, a.sum(dim=(2, 3)).unsqueeze(1))  # s: (B, 1, C)
    return channel_sum(a.shape[2] * a.shape[3] * torch.relu(v) * alpha, a)


def pooled_xgradcam(v: Tensor, a: Tensor) -> Tensor:
    """XGrad-CAM eq. 11 with g = v: w_c = v sum_hw A / (sum_hw A + eps)."""
    s = a.sum(dim=(2, 3)).unsqueeze(1)
    return channel_sum(v * s / (s + XGRADCAM_EPS), a)


def pooled_elementwise(v: Tensor, a: Tensor) -> Tensor:
    """Element-wise Grad-CAM with g = v: sum_c relu(v_c A_c) = sum_c relu(v_c) relu(A_c) + min(v_c, 0) min(A_c, 0).

    The product is positive exactly where both factors have the same sign, and is then the product of their
    positive parts or of their negative parts; so the map is two channel sums, two (K, C) x (C, h w) products
    per image, and the (B, K, C, h, w) product of the general rule never exists.
    """
    return channel_sum(torch.relu(v), torch.relu(a)) + channel_sum(v.clamp(max=0), a.clamp(max=0))


def pooled_argmax_channel(v: Tensor, a: Tensor) -> Tensor:
    b, c, h, w = a.shape
    idx = v.argmax(dim=2)  # (B, K)
    return a.reshape(b, c, h * w).gather(1, idx.unsqueeze(-1).expand(-1, -1, h * w)).view(b, -1, h, w)


def pooled_layercam(v: Tensor, a: Tensor) -> Tensor:
    """LayerCAM eq. 5-6 with g = v: sum_c relu(v_c) A_c."""
    return channel_sum(torch.relu(v), a)


# Grad-CAM's equation in every form (eq. 1-2): its table entry and Guided Grad-CAM share it.
GRADCAM = Rule(gradcam, gradcam_weights, channel_sum, mean=True)
