"""Noise-averaged input attributions: SmoothGrad and VarGrad (captum's ``NoiseTunnel`` over ``Saliency``) and
GradientShap (captum's ``GradientShap``), for B images x K classes x S noise samples.

SmoothGrad is the mean, VarGrad the variance, over S noisy copies ``x + eps_s`` (eps_s ~ N(0, stdevs^2)), of the
Saliency map ``|d S_k / dx|`` (captum's ``Saliency`` default, ``abs=True``; what ``NoiseTunnel(Saliency(model))``
gives, the usual way to ask captum for SmoothGrad; ``abs=False`` averages the signed gradient, as eq. 2 of the
paper writes it). The noise is drawn once, (S, B, C, H, W), from ``generator`` (reproducible) or passed as ``noise``;
captum's row order is (B, S): ``noise.transpose(0, 1).flatten(0, 1)`` is what captum would add.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcam._src.base import CAM, Split
from funcam._src.core.attributions import SALIENCY_OPTIONS, attribute
from funcam._src.core.request import Option, Request, generator_or_none, non_negative_float, positive_int


def draw_noise(x: Tensor, n: int, stdevs: float, generator: torch.Generator | None) -> Tensor:
    """``stdevs * N(0, 1)`` noise (n, B, C, H, W) in x's dtype and device, from ``generator`` (None: torch's)."""
    return stdevs * torch.randn((n,) + tuple(x.shape), generator=generator, dtype=x.dtype, device=x.device)


def noise_of(x: Tensor, req: Request) -> Tensor:
    """The request's noise (S, B, C, H, W): the ``noise`` option as given, else drawn (``nt_samples``, ``stdevs``,
    ``generator``)."""
    noise = req.options["noise"]
    if noise is None:
        return draw_noise(x, req.options["nt_samples"], req.options["stdevs"], req.options["generator"])
    if tuple(noise.shape[1:]) != tuple(x.shape):
        raise ValueError(f"noise must have shape (S, B, C, H, W) = (S, {', '.join(map(str, x.shape))}), got shape "
                         f"{tuple(noise.shape)}")
    return noise.to(dtype=x.dtype, device=x.device)


def _moments(target: nn.Module | Split, x: Tensor, req: Request, second: bool) -> tuple[CAM, int]:
    """(CAM of the sums over the S noisy copies of the saliency map m_s, (B, K, C, H, W), or of m_s and m_s^2,
    (B, K, 2, C, H, W) with ``second``; S)."""
    noise = noise_of(x, req)
    magnitude = req.options["abs"]

    def reduce(g: Tensor, eps: Tensor) -> Tensor:
        m = g.abs() if magnitude else g
        return torch.stack((m.sum(0), (m * m).sum(0)), dim=1) if second else m.sum(0)

    out = attribute(target, x, req, reduce, samples=(noise,), point=lambda xx, eps: xx + eps,
                    extra=(2,) if second else ())
    return out, noise.shape[0]


def smoothgrad_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """SmoothGrad (Smilkov et al. 2017, eq. 2; captum's ``NoiseTunnel(Saliency)``, nt_type "smoothgrad"):
    ``1/S sum_s |d S_k / dx (x + eps_s)|`` ``(B, K, C, H, W)``."""
    out, n = _moments(target, x, req, second=False)
    return out._replace(maps=out.maps * (1 / n))


def vargrad_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """VarGrad (Adebayo et al. 2018, sec. 2; captum's ``NoiseTunnel(Saliency)``, nt_type "vargrad"): the variance
    over the S noisy copies, ``E[m^2] - E[m]^2`` with m = ``|d S_k / dx (x + eps_s)|``, ``(B, K, C, H, W)``."""
    out, n = _moments(target, x, req, second=True)
    mean, square = out.maps[:, :, 0] * (1 / n), out.maps[:, :, 1] * (1 / n)
    return out._replace(maps=square - mean * mean)


def gradient_shap_draws(x: Tensor, n_baselines: int, n_samples: int, stdevs: float,
                        generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """GradientShap's random draws, in this order from ``generator``: which baseline (S, B) (long, in
    [0, n_baselines)), the point's fraction of the way from it to the noisy input (S, B) (uniform in [0, 1)), the
    noise (S, B, C, H, W) (``draw_noise``). S = ``n_samples``."""
    b = x.shape[0]
    which = torch.randint(n_baselines, (n_samples, b), generator=generator, device=x.device)
    alpha = torch.rand((n_samples, b), generator=generator, dtype=x.dtype, device=x.device)
    return which, alpha, draw_noise(x, n_samples, stdevs, generator)


def gradient_shap_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """GradientShap (Lundberg & Lee 2017, sec. 4 "Expected Gradients"; captum's ``GradientShap``): the mean over S
    draws of ``(x_s - b_s) * d S_k / dx (b_s + alpha_s (x_s - b_s))`` ``(B, K, C, H, W)``, where b_s is a baseline
    drawn from ``baselines`` (M, C, H, W), x_s = x + eps_s the noisy input and alpha_s ~ U[0, 1)."""
    base = req.options["baselines"]
    base = x.new_zeros((1,) + tuple(x.shape[1:])) if base is None else base.to(dtype=x.dtype, device=x.device)
    if tuple(base.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"baselines must have shape (M, C, H, W) = (M, {', '.join(map(str, x.shape[1:]))}), a "
                         f"distribution of M baselines, got shape {tuple(base.shape)}")
    n = req.options["n_samples"]
    samples = gradient_shap_draws(x, base.shape[0], n, req.options["stdevs"], req.options["generator"])

    def point(xx: Tensor, which: Tensor, alpha: Tensor, eps: Tensor) -> Tensor:
        a = alpha[:, :, None, None, None]
        return a * (xx + eps) + (1.0 - a) * base[which]  # captum's order of terms: the same rounding

    def reduce(g: Tensor, which: Tensor, alpha: Tensor, eps: Tensor) -> Tensor:
        return ((x + eps - base[which]) * g).sum(0)

    out = attribute(target, x, req, reduce, samples=samples, point=point)
    return out._replace(maps=out.maps * (1 / n))


def _tensor_or_none(name: str, ndim: int, shape: str) -> Any:
    def check(v: Any) -> Tensor | None:
        if v is None:
            return v
        if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim != ndim:
            got = f"shape {tuple(v.shape)}, dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"{name} must be None or a floating tensor {shape}, got {got}")
        return v
    return check


_STDEVS = ("stdevs", non_negative_float("stdevs"), "standard deviation of the Gaussian noise added to x, in x's "
           "units (captum's stdevs: NoiseTunnel's default 1.0, GradientShap's 0.0)")
NOISE_OPTIONS = SALIENCY_OPTIONS + (
    Option("nt_samples", 5, positive_int("nt_samples"), "noisy copies of x averaged (captum's nt_samples)", int),
    Option(_STDEVS[0], 1.0, *_STDEVS[1:], float),
    Option("generator", None, generator_or_none("generator"), "torch.Generator for reproducible noise"),
    Option("noise", None, _tensor_or_none("noise", 5, "(S, B, C, H, W)"),
           "the noise itself (S, B, C, H, W), instead of nt_samples, stdevs and generator"),
)
SHAP_OPTIONS = (
    Option("baselines", None, _tensor_or_none("baselines", 4, "(M, C, H, W)"),
           "the distribution of baselines (M, C, H, W) drawn from (None: one zero image)"),
    Option("n_samples", 5, positive_int("n_samples"), "draws of a baseline, a noisy input and a point between "
           "them (captum's n_samples)", int),
    Option(_STDEVS[0], 0.0, *_STDEVS[1:], float),
    Option("generator", None, generator_or_none("generator"), "torch.Generator for reproducible draws"),
)
