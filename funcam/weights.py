"""Per-class rules: gradient ``g (B, C, h, w)`` and features ``A (B, C, h, w)`` -> map ``(B, h, w)``.

One function per method, each the paper's equation. They run inside ``vmap`` over classes, so they use
only batched-friendly tensor ops (no ``.item()``, no branches on values). ReLU is applied later, by the
caller, at feature resolution (``relu=False`` keeps signed maps).
"""
from __future__ import annotations

import torch
from torch import Tensor

# pytorch-grad-cam's constants, so maps agree to float precision: eps of the Grad-CAM++ denominator
# (eq. 19) and of XGrad-CAM's normaliser.
GRADCAMPP_EPS = 1e-6
XGRADCAM_EPS = 1e-7


def weighted_sum(w: Tensor, a: Tensor) -> Tensor:
    """sum_c w_c A_c: w (B, C), A (B, C, h, w) -> (B, h, w)."""
    return torch.einsum("bc,bchw->bhw", w, a)


def gradcam(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): w_c = mean_hw g, map = sum_c w_c A_c."""
    return weighted_sum(g.mean(dim=(2, 3)), a)


def gradcam_max(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM with max-pooled gradients (eq. 1 of Selvaraju et al. with max for the mean): w_c = max_hw g."""
    return weighted_sum(g.amax(dim=(2, 3)), a)


def gradcampp(g: Tensor, a: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential's higher-order terms):

    alpha = g^2 / (2 g^2 + (sum_hw A) g^3 + eps), alpha = 0 where g == 0; w_c = sum_hw relu(g) alpha.
    """
    g2 = g * g
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + GRADCAMPP_EPS
    alpha = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
    return weighted_sum((torch.relu(g) * alpha).sum(dim=(2, 3)), a)


def xgradcam(g: Tensor, a: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020, eq. 11): w_c = sum_hw g A / (sum_hw A + eps)."""
    w = (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + XGRADCAM_EPS)
    return weighted_sum(w, a)


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


RULES = {
    "gradcam": gradcam,
    "gradcam_max": gradcam_max,
    "gradcampp": gradcampp,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "elementwise": elementwise,
    "layercam": layercam,
    "argmax_channel": argmax_channel,
}
