"""Input-gradient attributions (captum's Saliency, InputXGradient, IntegratedGradients) for B images x K classes.

Each is a sum over S points ``x_s`` near x of a reduction of the gradients ``d score_k / d x_s``, computed by
``engine.sampled_class_vjp``: the S points of a chunk in one forward of s * B images, that forward's one vjp vmapped
over the K classes. Maps come back per colour channel, ``(B, K, C, H, W)``, as captum returns them (with a K axis;
captum explains one target per image and call). The noise-averaged attributions are in ``core/noise.py``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core.engine import sampled_class_vjp
from funcam._src.core.guided import GUIDED_BYTES_PER_INPUT_BYTE
from funcam._src.core.request import Option, Request, flag, one_of, positive_int
from funcam._src.cuts.attention import explicit_sdpa

# Bytes one image's forward keeps for its vjp, per byte of the image: its saved activations (parameters not
# counted), measured at 224 x 224: resnet18 37x, vgg11 81x, vit_tiny 68x, resnet50 143x, densenet121 217x.
# A point of a sampled attribution costs this much on top of its classes' backwards (``GUIDED_BYTES_PER_INPUT_BYTE``
# each, the same per-class input-gradient estimate as Guided Backprop's).
SAMPLE_BYTES_PER_INPUT_BYTE = 160

INTEGRATIONS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


class _UnfusedAttention(TorchFunctionMode):
    """Fused attention computed explicitly (``explicit_sdpa``): the fused CPU kernel's backward has no vmap rule
    (a per-class loop, and a warning). Active only while the model's forward runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return explicit_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def forward_of(target: nn.Module | Split) -> Callable[[Tensor], Any]:
    """The forward a whole-model method differentiates: a Split's module (DataParallel unwrapped), with fused
    attention unfused."""
    model = _guard.unwrap(target.module if isinstance(target, Split) else target)

    def forward(inp: Tensor) -> Any:
        with _UnfusedAttention():
            return model(inp)
    return forward


def attribute(target: nn.Module | Split, x: Tensor, req: Request, reduce: Callable[..., Tensor], *,
              samples: tuple[Tensor, ...] | None = None, point: Callable[..., Tensor] | None = None,
              extra: tuple[int, ...] = ()) -> CAM:
    """``engine.sampled_class_vjp`` for the model behind ``target``, with this module's memory estimates;
    ``extra``: the dims ``reduce`` puts between B and (C, H, W) (for the empty result when K == 0)."""
    per_image = x[:1].numel() * x.element_size()
    return sampled_class_vjp(forward_of(target), x, req, reduce, samples=samples, point=point,
                             empty=lambda b: x.new_zeros((b, 0) + extra + tuple(x.shape[1:])),
                             sample_bytes=SAMPLE_BYTES_PER_INPUT_BYTE * per_image,
                             class_bytes=GUIDED_BYTES_PER_INPUT_BYTE * per_image)


def saliency_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """Saliency (Simonyan, Vedaldi & Zisserman 2014, sec. 3.1; captum's ``Saliency``): ``|d S_k / dx|``
    ``(B, K, C, H, W)``, or the signed gradient with ``abs=False``. One forward, one vjp vmapped over K."""
    magnitude = req.options["abs"]
    return attribute(target, x, req, lambda g: g[0].abs() if magnitude else g[0])


def input_x_gradient_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """Input x Gradient (Shrikumar et al. 2016, sec. 2; captum's ``InputXGradient``): ``x * d S_k / dx``
    ``(B, K, C, H, W)``, the first-order Taylor term of each input element."""
    return attribute(target, x, req, lambda g: x * g[0])


@torch.compiler.assume_constant_result  # static in (method, n): compiled code sees the numbers, not numpy
def integration_rule(method: str, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(alphas, step sizes), each n floats, of captum's ``approximation_parameters(method)``: the points in [0, 1]
    where Integrated Gradients evaluates the gradient and their weights in the sum approximating the integral.

    gausslegendre: the n-point Gauss-Legendre rule moved from [-1, 1] to [0, 1] (nodes (1 + t) / 2, weights w / 2).
    riemann_left / right / middle: alphas i / n, (i + 1) / n, (i + 1/2) / n, steps 1 / n. riemann_trapezoid: alphas
    i / (n - 1) and steps 1 / n halved at both ends, as captum has them (they sum to 1 - 1/n, not 1).
    """
    if method == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        return tuple((0.5 * (1 + t)).tolist()), tuple((0.5 * w).tolist())
    steps = [1 / n] * n
    if method == "riemann_trapezoid":
        steps[0] /= 2
        steps[-1] /= 2
        return tuple(i / (n - 1) for i in range(n)), tuple(steps)
    shift = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return tuple((i + shift) / n for i in range(n)), tuple(steps)


def as_baseline(x: Tensor, baselines: Any, name: str = "baselines") -> Tensor:
    """A baseline broadcastable to x (B, C, H, W), in x's dtype and device: None is zero, a number a constant."""
    if baselines is None:
        return x.new_zeros(())
    if not isinstance(baselines, Tensor):
        return x.new_full((), float(baselines))
    shape, want = tuple(baselines.shape), tuple(x.shape)
    if len(shape) > len(want) or any(d not in (1, w) for d, w in zip(shape[::-1], want[::-1])):
        raise ValueError(f"{name} must broadcast to x's shape {want} (e.g. (1, C, H, W) or (C, H, W)), got shape "
                         f"{shape}")
    return baselines.to(dtype=x.dtype, device=x.device)


def integrated_gradients_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """Integrated Gradients (Sundararajan, Taly & Yan 2017, eq. 1 and its Riemann sum, sec. 5; captum's
    ``IntegratedGradients``): ``(x - x') * sum_s w_s d S_k / dx (x' + alpha_s (x - x'))`` ``(B, K, C, H, W)``,
    with the ``integration`` rule's ``n_steps`` alphas and weights (``integration_rule``) and the baseline x'.

    The S = n_steps points (s, B, C, H, W) go through the model s * B at a time, each chunk's vjp vmapped over the
    K classes (``engine.sampled_class_vjp``); captum runs K * S * B forwards and backwards for K targets.
    """
    n, rule = req.options["n_steps"], req.options["integration"]
    if n < 2 and rule != "gausslegendre":
        raise ValueError(f"n_steps must be at least 2 for integration={rule!r} (captum's rule), got {n}")
    base = as_baseline(x, req.options["baselines"])
    alphas, steps = integration_rule(rule, n)

    def point(xx: Tensor, a: Tensor, w: Tensor) -> Tensor:
        return base + a.view(-1, 1, 1, 1, 1) * (xx - base)  # (s, B, C, H, W), as captum forms its scaled inputs

    def reduce(g: Tensor, a: Tensor, w: Tensor) -> Tensor:
        return torch.tensordot(w, g, dims=1)  # sum_s w_s g_s: (B, C, H, W)

    out = attribute(target, x, req, reduce, samples=(x.new_tensor(alphas), x.new_tensor(steps)), point=point)
    return out._replace(maps=out.maps * (x - base).unsqueeze(1))


def baselines_check(v: Any) -> Any:
    if v is None or (isinstance(v, Tensor) and v.is_floating_point()):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    raise TypeError(f"baselines must be None (zeros), a finite number or a floating tensor broadcastable to x "
                    f"(B, C, H, W), got {v!r}" if not isinstance(v, Tensor) else
                    f"baselines must be a floating tensor, got dtype {v.dtype}")


SALIENCY_OPTIONS = (
    Option("abs", True, flag("abs"), "the gradient's absolute value (captum's default); False: the signed gradient"),
)
IG_OPTIONS = (
    Option("n_steps", 50, positive_int("n_steps"), "points on the path from the baseline to x (captum's n_steps)",
           int),
    Option("baselines", None, baselines_check, "the baseline x': None (zeros), a number, or a tensor "
           "broadcastable to x"),
    Option("integration", "gausslegendre", one_of("integration", INTEGRATIONS),
           "the quadrature rule (captum's method): " + ", ".join(INTEGRATIONS), str),
)
