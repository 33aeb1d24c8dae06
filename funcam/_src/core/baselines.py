"""Model-free maps to score beside every method: random, centre and Sobel-edge maps, each an explainer
``(model, x (B, C, H, W), classes (K,) or (B, K)) -> maps (B, K, h, w)`` that ignores the model (and the class).

A metric that ranks a model-free map above a method does not measure the method's faithfulness to the model (the
Sobel map beats Grad-CAM on combined ROAD in pytorch-grad-cam's own metrics tutorial). ``with_baselines`` scores
a method's maps and the three baselines in one metric call, the baselines appended as extra classes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from funcam._src.core import evaluation as ev

__all__ = ["random_maps", "centre_maps", "sobel_maps", "BASELINES", "with_baselines"]


def _k(x: Tensor, classes: Any) -> int:
    """The number K of maps per image that ``classes`` asks for: (K,), (B, K), an int or a list."""
    if isinstance(classes, Tensor):
        return 1 if classes.ndim == 0 else int(classes.shape[-1])
    return 1 if isinstance(classes, int) else len(classes)


def random_maps(model: Callable | None, x: Tensor, classes: Any, *, resolution: int | None = 7,
                generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise maps ``(B, K, r, r)`` at ``resolution`` (a CAM's 7 x 7 grid by default, so that upsampling
    makes it as smooth as a CAM), or ``(B, K, H, W)`` per pixel for ``resolution=None``."""
    b, _, h, w = x.shape
    size = (h, w) if resolution is None else (resolution, resolution)
    dev = x.device if generator is None else generator.device
    return torch.rand((b, _k(x, classes)) + size, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def centre_maps(model: Callable | None, x: Tensor, classes: Any) -> Tensor:
    """A Gaussian centre prior ``(B, K, H, W)``: ``exp(-d^2 / (2 sigma^2))``, d the distance to the image centre,
    ``sigma = min(H, W) / 4`` (photographers centre their subject: Judd et al. 2009, "Learning to predict where
    humans look", ICCV, Sec. 3.4)."""
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2
    xs = torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2
    sigma = min(h, w) / 4
    m = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma ** 2))
    return m.expand(b, _k(x, classes), h, w).contiguous()


def sobel_maps(model: Callable | None, x: Tensor, classes: Any) -> Tensor:
    """Edge strength ``(B, K, H, W)``: the magnitude of the Sobel gradient (Sobel & Feldman 1968; 3 x 3 kernels,
    replicated border) of the channel mean, the same map for every class."""
    grey = x.detach().mean(dim=1, keepdim=True)
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([k, k.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return g.pow(2).sum(dim=1, keepdim=True).sqrt().expand(-1, _k(x, classes), -1, -1).contiguous()


BASELINES: dict[str, Callable[..., Tensor]] = {"random": random_maps, "centre": centre_maps, "sobel": sobel_maps}


def with_baselines(metric: Callable[..., Any], model: Callable, x: Tensor, maps: Tensor, classes: Any, *,
                   baseline_generator: torch.Generator | None = None, **options: Any) -> dict[str, Any]:
    """``{"maps": score, "random": ..., "centre": ..., "sobel": ...}``: ``metric(model, x, maps, classes, **options)``
    for the given maps and each baseline, from one call with the baselines appended as classes (K -> 4K).

    maps: ``(B, K, h, w)`` (upsampled to x's size with the baselines) or ``(B, K, C, H, W)`` (baselines repeated
    over channels). baseline_generator: draws the random maps (``generator`` goes to the metric). The result of a
    metric is split along its class dimension (``(B, 4K, ...)``, or a NamedTuple
    whose fields are); a metric that correlates across pairs (sensitivity-n) cannot be split and raises.
    For metrics that recompute explanations (robustness, MPRT), pass a baseline as their ``explain_fn`` instead.
    """
    ev.check_x(x)
    a = ev.attributions(maps, x, abs=False, normalise=False).to(x.dtype)  # (B, K, C', H, W)
    b, k, c = a.shape[:3]
    idx = classes if isinstance(classes, Tensor) else torch.as_tensor(classes, device=x.device)
    idx = idx.to(x.device).reshape(-1, k).expand(b, k) if idx.ndim < 2 else idx
    parts = [a]
    for name, fn in BASELINES.items():
        m = fn(model, x, idx, generator=baseline_generator) if name == "random" else fn(model, x, idx)
        parts.append(ev.attributions(m, x, abs=False, normalise=False).to(x.dtype).expand(b, k, c, *a.shape[3:]))
    joint = torch.cat(parts, dim=1)
    out = metric(model, x, joint if maps.ndim == 5 else joint[:, :, 0], idx.repeat(1, len(parts)), **options)
    names = ["maps", *BASELINES]

    def split(t: Any, i: int) -> Any:
        if isinstance(t, Tensor):
            if t.ndim < 2 or t.shape[:2] != (b, k * len(parts)):
                raise ValueError(f"the metric's result has shape {tuple(t.shape)}, not (B, 4K, ...) = "
                                 f"{(b, 4 * k)}: it cannot be split per map set; call it once per set")
            return t[:, i * k:(i + 1) * k]
        if hasattr(t, "_fields"):
            return type(t)(*(split(v, i) if isinstance(v, Tensor) else v for v in t))
        return t

    return {name: split(out, i) for i, name in enumerate(names)}
