"""ShapleyCAM (Cai et al. 2025, eq. 9; pytorch-grad-cam's ``ShapleyCAM``): Grad-CAM's channel weights with a
second-order correction, ``w_kc = mean_hw (g - 1/2 H A)_c`` with ``g = d s_k / dA`` and ``H A`` the Hessian of the
score in the features applied to the features; the map is ``sum_c w_kc A_c``.

As in the peer (``torch.autograd.grad(grads, activations, grad_outputs=activations)``), the Hessian is the head's:
the second derivative of the score in the features at the cut, the model before the cut held fixed. funcam takes it
by forward-mode differentiation of the head's vjp (``engine.class_hvp``), for all K classes in one vmap. A head that
is piecewise linear in the features (ReLU, max-pool, average pooling, a Linear) has a zero Hessian almost
everywhere, and ShapleyCAM is then Grad-CAM; the correction matters for heads with normalisation or smooth
activations (a ConvNeXt's LayerNorm, GELU) and for non-linear scores (softmax, the paper's ReST).
"""
from __future__ import annotations

from torch import Tensor

from funcam._src.base import CAM, Split
from funcam._src.core.engine import class_hvp
from funcam._src.core.projection import first_component
from funcam._src.core.request import Request
from funcam._src.core.rules import weighted_sum
from funcam._src.core.smoothing import AUG_SMOOTH, EIGEN_SMOOTH, RELU

SHAPLEY_OPTIONS = (RELU, AUG_SMOOTH, EIGEN_SMOOTH)


def shapley_weights(g: Tensor, hv: Tensor, a: Tensor) -> Tensor:
    """eq. 9: w_c = mean_hw (g - 1/2 H A), (B, C)."""
    return (g - 0.5 * hv).mean(dim=(2, 3))


def shapley_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """ShapleyCAM: maps ``(B, K, h, w)`` for every image and requested class (module docstring); with
    ``eigen_smooth``, the first principal component of ``w_kc A_c``."""
    if req.options["eigen_smooth"]:
        return class_hvp(split, x, req, lambda g, hv, a: first_component(shapley_weights(g, hv, a)[:, :, None, None]
                                                                           * a))
    return class_hvp(split, x, req, lambda g, hv, a: weighted_sum(shapley_weights(g, hv, a), a))
