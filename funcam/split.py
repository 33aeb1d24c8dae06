"""Cut a model into two pure callables: ``extract(x) -> features`` and ``head(features) -> logits``.

``head(extract(x))`` equals ``model(x)``. Nothing here registers hooks, copies parameters or changes the
model: the callables close over the user's modules and call them (or their FX graphs) as they are.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from funcam import _guard

__all__ = ["Features", "Pooled", "Split", "split", "check_split"]


class Features(NamedTuple):
    """What ``extract`` returns when the head needs more than the maps.

    maps: tuple of ``(B, C_i, h_i, w_i)`` tensors, the feature maps the CAMs are computed on.
    context: tensors the head needs but that are not explained (a ViT's residual stream and prefix tokens,
        values that skip over an FX cut); they are held constant when differentiating.
    chained: True when the head recomputes ``maps[1:]`` from ``maps[0]`` (several cut points on one path).
        The head then uses ``maps[i]`` for ``i >= 1`` only as a zero-valued tap for its gradient, so the
        gradient at an earlier map is the total derivative through the later ones.
    """

    maps: tuple
    context: tuple = ()
    chained: bool = False


class Pooled(NamedTuple):
    """A head that starts with global average pooling, as a function of the pooled feature.

    ``head(A) == classifier(pre_logits(A.mean((2, 3))))`` for every ``A (B, C, h, w)``, so the gradient of
    any logit w.r.t. ``A`` is constant over space, ``d logit / dA = (d logit / dz) / (h w)``: CAMs then need
    only ``(B, C)`` gradients, and the gradient of a logit at the classifier's input is its weight row.

    pre_logits: ``z (B, C) -> (B, D)``; classifier: the final ``nn.Linear`` (``(N, D)`` weight), or None
    when ``pre_logits`` already returns logits ``(B, N)``.
    """

    pre_logits: Callable[[Tensor], Tensor]
    classifier: nn.Module | None = None


class Split(NamedTuple):
    """A model as two pure callables.

    extract: ``x (B, in_chans, H, W) -> Tensor | tuple[Tensor, ...] | Features``.
    head: takes exactly what ``extract`` returned, gives logits ``(B, num_classes)``.
    in_chans: input channels, checked before the forward when known.
    layers: where the model was cut, one name per feature map in the order of ``Features.maps``
        (e.g. ``("layer3", "layer4")``, ``("blocks.11.norm1",)``, ``("forward_features",)``).
    pooled: the head as a function of the spatially averaged feature when it starts with global average
        pooling (``Pooled``), else None; it enables the exact fast path for many classes.
    module: the model the split was cut from, or None: funcam checks ``x``'s dtype against its parameters
        and handles its training mode (a warning; batch-norm statistics restored after each call).
    """

    extract: Callable[[Tensor], Any]
    head: Callable[[Any], Tensor]
    in_chans: int | None = None
    layers: tuple[str, ...] = ()
    pooled: Pooled | None = None
    module: nn.Module | None = None


def split(model: nn.Module, layer: str | Sequence[str] | None = None, *, token_cut: str | None = None,
          tracer_leaves: Sequence[type] = ()) -> Split:
    """Split ``model`` into ``Split(extract, head)``.

    Rules, in order:

    * ``layer`` given (a submodule name such as ``"layer4"`` or ``"features.29"``, an FX node name, or a
      list of them for multi-layer CAMs): the model is traced with ``torch.fx`` and cut after those nodes.
    * a timm Vision Transformer (``blocks`` + ``patch_embed``): the feature is a token feature inside the
      last block, with the residual stream held constant. ``token_cut="norm2"`` (the pre-FFN feature) is
      chosen for average/attention-pooled ViTs; ``token_cut="norm1"`` (before the last attention) for ViTs
      whose head reads only prefix tokens (``global_pool='token'``, DeiT-distilled), because after the last
      attention no patch token reaches the head and the norm2 gradient on patch tokens is exactly zero.
    * timm Swin (``layers`` of stages with NHWC blocks): ``norm2`` of the last block, tokens to a grid.
    * any other timm model with ``forward_features`` / ``forward_head`` (ResNet, ConvNeXt, EfficientNet,
      RegNet, MobileNetV3, VGG, DenseNet, ...): the output of ``forward_features``.

    ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers are unwrapped: the split is of the module inside.

    Tokens become a ``(B, C, h, w)`` map inside the split (``rearrange 'b (h w) c -> b c h w'``); prefix
    tokens (CLS, distillation, registers) travel in ``Features.context``.

    Raises ValueError naming the argument for an unknown layer (with the nearest valid names), an invalid
    ``token_cut``, or a ``token_cut="norm2"`` on a ViT whose head reads only prefix tokens.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split: model must be a torch.nn.Module, got {type(model).__name__}")
    model = _guard.unwrap(model)  # DataParallel / DistributedDataParallel: split the wrapped module
    return _split(model, layer, token_cut, tracer_leaves)._replace(module=model)


def _split(model: nn.Module, layer: str | Sequence[str] | None, token_cut: str | None,
           tracer_leaves: Sequence[type]) -> Split:
    if token_cut not in (None, "norm1", "norm2"):
        raise ValueError(f"split: token_cut must be None, 'norm1' or 'norm2', got {token_cut!r}")
    in_chans = _in_chans(model)
    if layer is not None:
        if token_cut is not None:
            raise ValueError("split: give either layer= (an FX cut) or token_cut= (a ViT/Swin cut), not both")
        from funcam._fx import fx_split
        names = [layer] if isinstance(layer, str) else list(layer)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"split: layer must be a name or a non-empty list of names, got {layer!r}")
        extract, head, ordered = fx_split(model, names, tracer_leaves=tuple(tracer_leaves))
        return Split(extract, head, in_chans, ordered)
    from funcam import _tokens
    if _tokens.is_vit(model):
        extract, head, layers = _tokens.vit_split(model, token_cut)
        return Split(extract, head, in_chans, layers)
    if _tokens.is_swin(model):
        extract, head, layers = _tokens.swin_split(model, token_cut)
        return Split(extract, head, in_chans, layers)
    if token_cut is not None:
        raise ValueError(f"split: token_cut={token_cut!r} applies to timm ViT and Swin models only, "
                         f"got a {type(model).__name__}")
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return Split(model.forward_features, model.forward_head, in_chans, ("forward_features",),
                     _pooled_head(model))
    raise ValueError(
        f"split: {type(model).__name__} has no forward_features/forward_head; pass layer='NAME' to cut it "
        f"after a submodule, e.g. one of {suggest_names(model, '')[:5]}")


def check_split(split: Split, x: Tensor, model: nn.Module | None = None, *, atol: float = 1e-4) -> None:
    """Validate a split on an input ``x (B, C, H, W)``; raise ValueError with the fix when it is wrong.

    Checks that ``head(extract(x))`` equals ``model(x)`` (when ``model`` is given) and that the logits
    depend on every feature map: an all-zero gradient for a random cotangent means the cut point does not
    reach the logits (e.g. norm2 of a CLS-pooled ViT), and every map would come out zero.
    """
    # guarded like every entry point: a training-mode model warns and keeps its batch-norm statistics
    _guard.run(model if model is not None else split.module, lambda: _check_split(split, x, model, atol))


def _check_split(split: Split, x: Tensor, model: nn.Module | None, atol: float) -> None:
    from funcam.grads import as_features

    feats = split.extract(x)
    fs, rebuild = as_features(feats)
    logits, vjp_fn = torch.func.vjp(lambda *ms: split.head(rebuild(ms)), *fs.maps)
    if model is not None:
        ref = model(x)
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


def _pooled_head(model: nn.Module) -> Pooled | None:
    """``Pooled`` for a timm model whose ``forward_head`` starts with global average pooling, else None.

    timm's ``forward_head(x, pre_logits=True)`` stops before the classifier; fed a ``(B, C, 1, 1)`` map it
    equals the head at any map with that spatial mean iff the head's first operation is average pooling.
    The structure is checked first (an average ``global_pool``), then numerically on a random probe, so a
    head that pools otherwise (max, attention, a 7x7 conv as in VGG) keeps the general path.
    """
    if torch.compiler.is_compiling():
        return None  # the probe branches on values; a split built inside a compiled region uses the general path
    pool = getattr(model, "global_pool", None)
    if pool is None:
        pool = getattr(getattr(model, "head", None), "global_pool", None)
    if getattr(pool, "pool_type", None) != "avg" or not hasattr(model, "get_classifier"):
        return None
    clf = model.get_classifier()
    clf = clf if isinstance(clf, nn.Linear) else None

    def pre_logits(z: Tensor) -> Tensor:
        return model.forward_head(z[:, :, None, None], pre_logits=clf is not None)

    try:
        param = next(model.parameters())
        c = int(model.num_features)
        probe = torch.randn(2, c, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = probe.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            want = model.forward_head(probe)
            p = pre_logits(probe.mean(dim=(2, 3)))
            got = clf(p) if clf is not None else p
        ok = want.shape == got.shape and torch.allclose(want, got, rtol=1e-3, atol=1e-4)
    except Exception:  # noqa: BLE001 - any head that does not take a pooled map keeps the general path
        return None
    return Pooled(pre_logits, clf) if ok else None


def suggest_names(model: nn.Module, name: str, extra: Sequence[str] = ()) -> list[str]:
    """Submodule (and extra node) names nearest to ``name``, for error messages."""
    names = [n for n, _ in model.named_modules() if n] + list(extra)
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    return close or names[-8:]


def _in_chans(model: nn.Module) -> int | None:
    # The first convolution sees the image in every supported family (stems, patch embeddings, VGG).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None
