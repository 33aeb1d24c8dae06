"""FullGrad (Srinivas & Fleuret 2019, eq. 6 and sec. 4; pytorch-grad-cam's ``FullGrad``): the input gradient and every
2-d bias gradient, for every class from one forward and one vmapped vjp, at input resolution.

The full-gradient decomposition ``y = grad_x y . x + sum_l sum_c b_lc . grad_{o_l} y_c`` (eq. 6; ``o_l`` the output
of layer l, ``b_l`` its bias) gives the saliency map (sec. 4, "FullGrad aggregation")
``sum_c psi(|x_c grad_{x_c} y|) + sum_l sum_c psi(|b_lc grad_{o_lc} y|)``, with ``psi`` pytorch-grad-cam's
post-processing of each channel: min-max scaled (eps 1e-7), then bilinearly resized to the input. Since resizing is
linear, funcam sums each layer's scaled channels at their own resolution and resizes the sum once.

The layers are pytorch-grad-cam's: every ``nn.Conv2d`` and ``nn.BatchNorm2d`` with a bias (subclasses too, such as
timm's ``BatchNormAct2d``, which the peer's exact type test leaves out), with a batch norm's effective bias
``b - running_mean * w / sqrt(running_var + eps)``. Their outputs' gradients come without hooks: a
``TorchFunctionMode``, active only while the model's forward runs, adds a zero-valued tap to the output of each
``conv2d`` / ``batch_norm`` call whose bias is such a layer's, and the taps are primals of the vjp (a first forward
without gradients finds the calls and their shapes); it computes fused attention explicitly, as Guided Backprop's
mode does (its CPU backward has no vmap rule). The model is never modified.

eigen_smooth is not offered: pytorch-grad-cam's FullGrad projects its per-layer maps at 1/8 of the input resolution,
a different operation from the other methods' projection of channel terms.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core.engine import class_vjp
from funcam._src.core.guided import GUIDED_BYTES_PER_INPUT_BYTE
from funcam._src.core.postprocess import normalize, upsample
from funcam._src.core.request import Request
from funcam._src.core.smoothing import AUG_SMOOTH
from funcam._src.cuts.attention import explicit_sdpa
from funcam._src.cuts.vit import check_size, is_vit

FULLGRAD_OPTIONS = (AUG_SMOOTH,)


def bias_layers(model: nn.Module) -> dict[int, nn.Module]:
    """id(bias parameter) -> its layer, for every Conv2d / BatchNorm2d with a bias."""
    return {id(m.bias): m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and getattr(m, "bias", None) is not None}


def _bias_arg(func: Any, args: tuple, kwargs: dict) -> Any:
    if func is F.conv2d:
        return args[2] if len(args) > 2 else kwargs.get("bias")
    if func is F.batch_norm:
        return args[4] if len(args) > 4 else kwargs.get("bias")
    return None


def _effective_bias(func: Any, args: tuple, kwargs: dict) -> Tensor:
    """The bias a layer adds to its output, (C,): a convolution's own; a batch norm's, with its running statistics."""
    bias = _bias_arg(func, args, kwargs)
    if func is F.conv2d:
        return bias
    named = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"), args))
    named.update(kwargs)
    mean, var, weight = named.get("running_mean"), named.get("running_var"), named.get("weight")
    if mean is None or var is None:
        return bias
    scale = (weight if weight is not None else torch.ones_like(bias)) / torch.sqrt(var + named.get("eps", 1e-5))
    return bias - mean * scale


class _BiasTaps(TorchFunctionMode):
    """Adds ``taps[i]`` to the output of the i-th conv2d / batch_norm call whose bias is one of ``layers``', and records
    each call's (effective bias, output shape) in ``found``."""

    def __init__(self, layers: dict[int, nn.Module], taps: tuple[Tensor, ...] | None):
        super().__init__()
        self.layers, self.taps, self.found = layers, taps, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # fused attention's CPU backward has no vmap rule
            return explicit_sdpa(*args, **kwargs)
        out = func(*args, **kwargs)
        bias = _bias_arg(func, args, kwargs)
        if bias is None or id(bias) not in self.layers or not isinstance(out, Tensor) or out.ndim != 4:
            return out
        i = len(self.found)
        self.found.append((_effective_bias(func, args, kwargs), tuple(out.shape)))
        return out if self.taps is None else out + self.taps[i]


def _psi_sum(t: Tensor, size: tuple[int, int]) -> Tensor:
    """sum_c psi(|t_c|) at input resolution: t (B, C, h, w) -> (B, H, W) (module docstring)."""
    s = normalize(t.abs()).sum(dim=1, keepdim=True)
    return (s if tuple(s.shape[-2:]) == size else upsample(s, size)).squeeze(1)


def full_grad(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """FullGrad: ``CAM(maps (B, K, H, W) at input resolution, classes, logits)`` (module docstring)."""
    model = _guard.unwrap(target.module if isinstance(target, Split) else target)
    if is_vit(model):
        check_size(model, x)  # a ValueError naming x where timm would assert
    layers = bias_layers(model)
    with torch.no_grad(), _BiasTaps(layers, None) as probe:
        model(x)
    if not probe.found:
        raise ValueError(f"fullgrad needs Conv2d or BatchNorm2d layers with a bias on the input's path; "
                         f"{type(model).__name__} has none")
    taps = tuple(x.new_zeros(shape) for _, shape in probe.found)
    size = tuple(x.shape[-2:])

    def forward(inp: Tensor, *t: Tensor) -> tuple[Tensor, tuple]:
        with _BiasTaps(layers, t) as mode:
            out = model(inp)
        return out, (inp, tuple(b for b, _ in mode.found))

    def reduce(grads: tuple[Tensor, ...], aux: tuple) -> Tensor:
        inp, biases = aux
        total = _psi_sum(grads[0] * inp, size)
        for g, b in zip(grads[1:], biases):
            total = total + _psi_sum(g * b.view(1, -1, 1, 1), size)
        return total

    return class_vjp(forward, (x,) + taps, req, reduce, empty=lambda b: x.new_zeros((b, 0) + size),
                     per_class_bytes=GUIDED_BYTES_PER_INPUT_BYTE * x.numel() * x.element_size())
