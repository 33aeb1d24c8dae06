"""Cut a model into two pure callables: ``extract(x) -> features`` and ``head(features) -> logits``.

``head(extract(x))`` equals ``model(x)``. Nothing here registers hooks, copies parameters or changes the
model: the callables close over the user's modules and call them (or their captured graphs) as they are. Which
family a model belongs to, and how it is cut, is the route table's (``funcam._src.cuts.route``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.base import Features, Pooled, Split, as_features
from funcam._src.cuts.capture import SplitArgs, declared_in_chans, first_output
from funcam._src.cuts.route import route_for

__all__ = ["Features", "Pooled", "Split", "check_split", "in_chans_of", "split"]


def split(model: nn.Module, layer: str | Sequence[str] | None = None, *, token_cut: str | None = None,
          tracer_leaves: Sequence[type] = (), example: Tensor | None = None) -> Split:
    """Split ``model`` into ``Split(extract, head)``: any image model, cut where its outputs last depend on positions.

    Rules, in order:

    * ``layer`` given (a submodule name such as ``"layer4"``, ``"features.29"`` or
      ``"vit.encoder.layer.11.layernorm_before"``, a node name, or a list of them for multi-layer CAMs): the
      model's graph is captured (``torch.export``; ``torch.fx`` for FX node names and where export fails) and
      cut after those values, whatever their layout (NCHW, NHWC, tokens with prefix tokens).
    * a timm Vision Transformer whose last block is a pre-norm block with plain softmax attention (checked on
      the block itself): a token feature inside the last block, the residual stream held constant.
      ``token_cut="norm2"`` (the pre-FFN feature) for average/attention-pooled ViTs; ``token_cut="norm1"``
      (before the last attention) for ViTs whose head reads only prefix tokens (CLS pooling, DeiT-distilled).
    * a timm Swin whose last block is pre-norm (Swin v1; checked on the block): ``norm2`` of the last block.
    * a timm model whose ``forward_features`` returns a feature map (NCHW, or NHWC as MambaOut; read from the
      output's shape): the output of ``forward_features``, with timm's ``forward_head``.
    * any other model (timm transformers with token features, torchvision, Hugging Face, your own): the graph
      route (``funcam._src.cuts.auto``). The default cut is the last value on the input's grid whose gradient from the
      model's first output is non-zero at grid positions (the last stage of a CNN, the final tokens of an
      average-pooled transformer), moved before the last attention when after it only prefix tokens reach the
      output (CLS-pooled and class-attention heads). Each input size is captured once and checked on first use:
      ``head(extract(x)) == model(x)``, the gradient reaches the grid, the grid has the input's aspect ratio.

    example: an input ``(B, C, H, W)`` to capture the graph route with now (at ``split`` time), so that ``layers``
        is known and a compiled caller never meets a first capture; by default the model's configured input size.
    ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers are unwrapped: the split is of the module inside.

    Token features become ``(B, C, h, w)`` maps inside the split; prefix tokens (CLS, distillation, registers)
    travel in ``Features.context`` and are held constant. ``split.layers`` names the cut.

    Raises ValueError naming the argument for an unknown layer (with the nearest valid names), a layer whose
    value is not on the input's grid, an invalid ``token_cut``, a model with no usable cut, or a capture that
    does not reproduce the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split: model must be a torch.nn.Module, got {type(model).__name__}")
    model = _guard.unwrap(model)  # DataParallel / DistributedDataParallel: split the wrapped module
    if example is not None:
        _guard.check_input(example, None, model)
    args = split_args(layer, token_cut, tracer_leaves, example)
    return route_for(model, args).split(model, args)._replace(module=model)


def split_args(layer: Any, token_cut: Any, tracer_leaves: Any, example: Tensor | None) -> SplitArgs:
    """``split``'s arguments, checked once."""
    if token_cut not in (None, "norm1", "norm2"):
        raise ValueError(f"split: token_cut must be None, 'norm1' or 'norm2', got {token_cut!r}")
    names = None
    if layer is not None:
        if token_cut is not None:
            raise ValueError("split: give either layer= (a graph cut) or token_cut= (a ViT/Swin cut), not both")
        names = [layer] if isinstance(layer, str) else list(layer) if isinstance(layer, (list, tuple)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"split: layer must be a name or a non-empty list of names, got {layer!r}")
    return SplitArgs(None if names is None else tuple(names), token_cut, tuple(tracer_leaves), example)


@_guard.entry(checks=False)
def check_split(split: Split, x: Tensor, model: nn.Module | None = None, *, atol: float = 1e-4) -> None:
    """Validate a split on an input ``x (B, C, H, W)``; raise ValueError with the fix when it is wrong.

    Checks that ``head(extract(x))`` equals ``model(x)`` (when ``model`` is given) and that the logits
    depend on every feature map: an all-zero gradient for a random cotangent means the cut point does not
    reach the logits (e.g. norm2 of a CLS-pooled ViT), and every map would come out zero.
    """
    _check_split(split, x, model, atol)


def in_chans_of(model_or_split: Any) -> int | None:
    """The input channels an entry point checks ``x`` against: a split's, or those the model declares."""
    if isinstance(model_or_split, Split):
        return model_or_split.in_chans
    model = _guard.unwrap(model_or_split)
    return declared_in_chans(model) if isinstance(model, nn.Module) else None


def _check_split(split: Split, x: Tensor, model: nn.Module | None, atol: float) -> None:
    feats = split.extract(x)
    fs, rebuild = as_features(feats)
    logits, vjp_fn = torch.func.vjp(lambda *ms: first_output(split.head(rebuild(ms))), *fs.maps)
    if model is not None:
        ref = first_output(model(x))
        if ref.shape != logits.shape or not torch.allclose(ref, logits, atol=atol, rtol=1e-4):
            err = (ref - logits).abs().max().item() if ref.shape == logits.shape else float("nan")
            raise ValueError(f"check_split: head(extract(x)) differs from model(x) (max abs error {err:.3g}, "
                             f"shapes {tuple(logits.shape)} vs {tuple(ref.shape)})")
    cot = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=logits.dtype)
    grads = vjp_fn(cot.to(logits.device))
    for i, g in enumerate(grads):
        if not bool(torch.any(g != 0)):
            raise ValueError(
                f"check_split: the gradient of the logits w.r.t. feature map {i} (shape {tuple(g.shape)}) is "
                f"exactly zero, so every CAM would be zero. The cut point does not reach the logits; for a "
                f"ViT that pools the CLS token cut before the last attention: split(model, token_cut='norm1')")

