"""Cut a model into two pure callables: ``extract(x) -> features`` and ``head(features) -> logits``.

``head(extract(x))`` equals ``model(x)``. Nothing here registers hooks, copies parameters or changes the
model: the callables close over the user's modules and call them (or their FX graphs) as they are.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from funcam._src import guard as _guard

from funcam._src.base import Features, Pooled, Split

__all__ = ["Features", "Pooled", "Split", "split", "check_split"]


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
      route, ``funcam.cuts``. The default cut is the last value on the input's grid whose gradient from the
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
    return _split(model, layer, token_cut, tracer_leaves, example)._replace(module=model)


def _split(model: nn.Module, layer: str | Sequence[str] | None, token_cut: str | None,
           tracer_leaves: Sequence[type], example: Tensor | None) -> Split:
    from funcam._src.cuts import timm as timm_cuts
    from funcam._src.cuts.shifted import conv_mlp_head

    if token_cut not in (None, "norm1", "norm2"):
        raise ValueError(f"split: token_cut must be None, 'norm1' or 'norm2', got {token_cut!r}")
    in_chans = _in_chans(model)
    if layer is not None:
        if token_cut is not None:
            raise ValueError("split: give either layer= (a graph cut) or token_cut= (a ViT/Swin cut), not both")
        names = [layer] if isinstance(layer, str) else list(layer) if isinstance(layer, (list, tuple)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"split: layer must be a name or a non-empty list of names, got {layer!r}")
        return _layer_split(model, names, tuple(tracer_leaves), example, in_chans)
    if timm_cuts.is_vit(model) and (token_cut is not None or timm_cuts.vit_blocks_ok(model)):
        extract, head, layers, shifted = timm_cuts.vit_split(model, token_cut)
        return Split(extract, head, in_chans, layers, shifted=shifted)
    if timm_cuts.is_swin(model) and (token_cut is not None or timm_cuts.swin_blocks_ok(model)):
        extract, head, layers, shifted = timm_cuts.swin_split(model, token_cut)
        return Split(extract, head, in_chans, layers, shifted=shifted)
    if token_cut is not None:
        raise ValueError(f"split: token_cut={token_cut!r} applies to timm ViT and Swin models only, "
                         f"got a {type(model).__name__}")
    if hasattr(model, "forward_features") and hasattr(model, "forward_head") and isinstance(
            getattr(model, "num_features", None), int):
        # inside a compiled region the shape probe cannot run: timm's split, its layout read at every call
        compiling = torch.compiler.is_compiling()
        layout = "NCHW" if compiling else timm_cuts.features_layout(model)
        if layout is not None:
            extract, head, layers = timm_cuts.features_split(model, None if compiling else layout)
            pooled = _pooled_head(model) if layout == "NCHW" else None
            shifted = conv_mlp_head(model) if layout == "NCHW" and pooled is None else None
            return Split(extract, head, in_chans, layers, pooled, shifted=shifted)
    return _graph_split(model, None, example, in_chans)


def _layer_split(model: nn.Module, names: list[str], leaves: tuple, example: Tensor | None,
                 in_chans: int | None) -> Split:
    """Cut after named values: submodule paths through the captured graph, FX node names through torch.fx."""
    from funcam._src.cuts.capture import CaptureError

    modules = {n for n, _ in model.named_modules() if n}
    if leaves or not all(n in modules for n in names):
        # FX node names (``layer4_1_relu_1``), or FX's tracer asked for by tracer_leaves
        from funcam._src.cuts.fx import fx_split

        try:
            extract, head, ordered, pools = fx_split(model, names, tracer_leaves=leaves)
            return Split(extract, head, in_chans, ordered, _fx_pooled(model, extract, head, pools, example, in_chans))
        except ValueError as e:
            if leaves or "could not trace" not in str(e):
                raise  # an unknown name, or the escape hatch for FX's tracer was asked for
    try:
        return _graph_split(model, names, example, in_chans)
    except CaptureError as e:
        from funcam._src.cuts.fx import fx_split

        try:
            extract, head, ordered, pools = fx_split(model, names, tracer_leaves=leaves)
        except ValueError:
            raise e from None
        return Split(extract, head, in_chans, ordered, _fx_pooled(model, extract, head, pools, example, in_chans))


def _fx_pooled(model: nn.Module, extract: Any, head: Any, pools: bool, example: Tensor | None,
               in_chans: int | None) -> Pooled | None:
    """``Pooled`` for an FX cut whose head starts with global average pooling (``funcam.cuts.pooled``), else None.
    The FX graph serves every input size, so one numeric check, at ``example`` or the model's configured size,
    decides for all of them."""
    from funcam._src.cuts.pooled import bound, cut_averages_first

    if not pools or torch.compiler.is_compiling():
        return None
    x = example if example is not None else default_example(model, in_chans)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _guard.TrainingModeWarning)
            ok = _guard.run(model, lambda: cut_averages_first(extract, head, x[:2]))
    except Exception:  # noqa: BLE001 - a model that does not run at its configured size keeps the general path
        return None
    return bound(head, ()) if ok else None


def _graph_split(model: nn.Module, names: list[str] | None, example: Tensor | None, in_chans: int | None) -> Split:
    """The graph route. Captured now at ``example``, or - for the default cut, whose name ``layers`` must give - at
    the model's configured size; a single named cut without an example is captured on first use (its name is
    known)."""
    from funcam._src.cuts.auto import GraphCut

    gc = GraphCut(model, names)
    # several names need the graph now: their maps come in graph order, which ``layers`` reports. One name is
    # captured on first use; whether each capture's head pools first is then known only there, so ``pooled`` is
    # the lookup ``gc.pooled`` (None for a capture that does not), and ``example=`` settles it now.
    if names is not None and len(names) == 1 and example is None:
        return Split(gc.extract, gc.head, in_chans, tuple(names), gc.pooled, graph=gc)
    x = example if example is not None else default_example(model, in_chans)
    with torch.no_grad(), warnings.catch_warnings():
        # a training-mode model is captured as it is (batch statistics, dropout); the entry points warn
        warnings.simplefilter("ignore", _guard.TrainingModeWarning)
        _, entry = _guard.run(model, lambda: gc.entry(x))
    return Split(gc.extract, gc.head, in_chans, entry.layers, gc.pooled if entry.pooled else None, graph=gc)


def default_example(model: nn.Module, in_chans: int | None = None) -> Tensor:
    """One random input at the model's configured size: Hugging Face ``config.image_size``, timm's
    ``pretrained_cfg['input_size']`` or patch embedding size, torchvision's ``image_size``; else 224x224."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "image_size", None) or getattr(model, "image_size", None)
    pe = getattr(model, "patch_embed", None)
    if size is None and getattr(pe, "img_size", None) is not None:
        size = tuple(pe.img_size)
    if size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[1:]
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    p = next(model.parameters(), None)
    dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, in_chans or 3, int(h), int(w), generator=g).to(device=device, dtype=dtype)


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
    return _in_chans(model) if isinstance(model, nn.Module) else None


def _check_split(split: Split, x: Tensor, model: nn.Module | None, atol: float) -> None:
    from funcam._src.base import as_features

    from funcam._src.cuts.capture import first_output

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


def _in_chans(model: nn.Module) -> int | None:
    """The input channels the model declares (timm's ``in_chans``, Hugging Face ``config.num_channels``), else the
    first convolution's (torchvision stems); a space-to-depth stem (TResNet) declares its own."""
    for v in (getattr(model, "in_chans", None), getattr(getattr(model, "config", None), "num_channels", None)):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None
