"""Guided Backprop (Springenberg et al. 2015) and Guided Grad-CAM (Selvaraju et al. 2017), without hooks.

The guided rule changes only the backward of ReLU: where the forward input was positive, pass the positive
part of the incoming gradient (Springenberg et al. 2015, eq. for "guided backpropagation":
``R_l = (f_l > 0) * (R_{l+1} > 0) * R_{l+1}``). Instead of swapping or hooking ``nn.ReLU`` modules, a
``TorchFunctionMode`` that is active only while the model's forward runs routes every ReLU call through a
custom autograd function with that backward: ``F.relu`` (which ``nn.ReLU`` calls, ``inplace=True`` included),
``torch.relu``/``relu_``, ``Tensor.relu``/``relu_``, and ReLU6 (``F.relu6``, and ``F.hardtanh`` with
``min_val=0``, which ``nn.ReLU6`` calls; the rule then passes where ``0 < x < max_val``). The user's model is
never modified: same modules, same ``inplace`` flags, no hooks.

In-place ReLU calls are answered out of place (the function returns the new tensor, which every ``nn.ReLU``
user - torchvision, timm - consumes); code that calls ``x.relu_()`` and ignores the result is not supported.

Other activations (GELU, SiLU, sigmoid, ...) keep their ordinary gradient: the guided rule is defined for
ReLU only, and a made-up extension would not be Springenberg's method. A forward that calls no ReLU at all
(e.g. a ViT with GELU) would silently give the plain input gradient under this name, so it raises ValueError.

Compile: works under ``torch.compile(fullgraph=True)`` (dynamo traces the mode and the custom function's
vmap rule). One limitation: dynamo models no attributes on a mode object, so the ReLU-free check above runs
in eager only; compiled, a ReLU-free model returns its plain input gradient.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core import rules
from funcam._src.core.engine import class_maps, class_vjp
from funcam._src.core.postprocess import upsample
from funcam._src.core.request import Request
from funcam._src.cuts.attention import explicit_sdpa


class _GuidedClamp(torch.autograd.Function):
    """clamp(x, lo, hi) forward; backward passes the positive gradient where lo < x (< hi)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, lo: float, hi: float | None) -> Tensor:
        return x.clamp(min=lo) if hi is None else x.clamp(min=lo, max=hi)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, ctx.lo, ctx.hi = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        open_ = x > ctx.lo if ctx.hi is None else (x > ctx.lo) & (x < ctx.hi)
        return g.clamp(min=0) * open_, None, None


_RELU = (F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
_RELU6 = (F.relu6,)


class _GuidedReLUMode(TorchFunctionMode):
    """Routes ReLU-family calls through ``_GuidedClamp``; counts those on the input's path (``seen``) to detect
    models without a guided rule; computes fused attention explicitly (its CPU backward has no vmap rule)."""

    seen = 0  # dynamo models no attributes of a mode: counted in eager only (see ``_count``)

    def _count(self, t: Tensor) -> None:
        # only a ReLU of something that depends on the input counts: inside the vjp, exactly those tensors require
        # grad (a ReLU in SwinV2's position-bias MLP sees a constant table, and guiding it changes nothing)
        if not torch.compiler.is_compiling() and t.requires_grad:
            self.seen += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU:
            self._count(args[0])
            return _GuidedClamp.apply(args[0], 0.0, None)
        if func in _RELU6:
            self._count(args[0])
            return _GuidedClamp.apply(args[0], 0.0, 6.0)
        if func is F.hardtanh:
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            if lo == 0:
                self._count(args[0])
                return _GuidedClamp.apply(args[0], 0.0, float(hi))
        if func is F.scaled_dot_product_attention:
            return explicit_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


# Bytes one vmapped class of Guided Backprop holds, per byte of the input x (B, C, H, W): its input gradient and
# the activation gradients of the layer its backward is in. Measured as the resident memory per extra class in
# one unchunked vmap at 224x224, B = 2: resnet18 45x (about eight (B, 64, H/2, W/2) stem-sized gradients at
# once), vgg11 33x; a ReLU CNN's widest activation is rarely above 21x the input (VGG's 64 channels at full
# resolution), so 64 leaves room for architectures not measured.
GUIDED_BYTES_PER_INPUT_BYTE = 64


def guided_backprop_cam(target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
    """Guided Backprop (Springenberg et al. 2015): ``CAM(maps = d score_k / dx (B, K, C, H, W) with every ReLU's
    backward replaced by the guided rule, classes, logits)``; one forward, one vjp, vmapped over the K one-hot
    cotangents in chunks bounded by ``max_memory`` (``GUIDED_BYTES_PER_INPUT_BYTE`` x the input's bytes per
    class) unless ``chunk_size`` is given. Raises ValueError for a model whose forward calls no ReLU (see the
    module docstring)."""
    model = _guard.unwrap(target.module if isinstance(target, Split) else target)

    def forward(inp: Tensor) -> tuple[Tensor, tuple]:
        # the mode is active only here, so the vjp's backward (the guided rule) and the user's other code
        # never see it
        with _GuidedReLUMode() as mode:
            logits = model(inp)
        if not torch.compiler.is_compiling() and not mode.seen:
            raise ValueError(f"guided backprop needs ReLU activations, but the forward of {type(model).__name__} "
                             f"called none (GELU/SiLU models have no guided rule); use funcam.gradcam or, for "
                             f"ViTs, funcam.chefer_relevance")
        return logits, ()

    return class_vjp(forward, (x,), req, lambda grads, _: grads[0],
                     empty=lambda b: x.new_zeros((b, 0) + tuple(x.shape[1:])),
                     per_class_bytes=GUIDED_BYTES_PER_INPUT_BYTE * x.numel() * x.element_size())


def guided_gradcam_cam(split: Split, x: Tensor, req: Request) -> CAM:
    """Guided Grad-CAM (Selvaraju et al. 2017, sec. 3.1): Guided Backprop times Grad-CAM (ReLU'd, at the split's
    cut) upsampled bilinearly to (H, W): ``CAM(maps (B, K, C, H, W), classes, logits)``. Both explain the same
    class indices: those resolved from the guided forward's logits (a ``classes`` callable is passed to both and
    scored on the same logits). ``max_memory`` bounds each of the two vmaps in turn."""
    gb = guided_backprop_cam(split, x, req)
    same = req if gb.classes is None else req.with_classes(gb.classes)
    cams = class_maps(split, x, same, rules.GRADCAM).maps
    if isinstance(cams, tuple):
        raise ValueError(f"guided_gradcam takes one layer, got a split at {list(split.layers)}")
    return gb._replace(maps=gb.maps * upsample(torch.relu(cams), x.shape[-2:]).unsqueeze(2))
