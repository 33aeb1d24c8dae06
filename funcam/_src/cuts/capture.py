"""Capture a model's forward as an ATen graph with ``torch.export``, bound to the model's own parameters.

``torch.fx`` symbolic tracing stops at Python control flow on shapes and at Hugging Face models ("Proxy object
cannot be iterated"); ``torch.export`` (non-strict) runs the real Python forward on fake tensors, so it captures
torchvision, timm and Hugging Face models alike, and every node keeps the module path it came from
(``nn_module_stack``), which is how ``layer="vit.encoder.layer.11.layernorm_before"`` finds its node.

The batch size is captured as a symbol, so one graph serves every batch size, and the batch axis of every value
is known exactly; height and width are fixed (one capture per input size). Shapes read from ``x`` become
``sym_size`` nodes, plain integers for the graph that uses them.

The graph reads the model's parameters and buffers at every call, by name, from the model itself (never copies):
maps stay differentiable w.r.t. the parameters, follow weight updates, and ``torch.func.functional_call`` can
swap them in.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn


class Captured(NamedTuple):
    """A model's forward as a graph over the model's tensors.

    graph: ATen-level ``fx.Graph``; placeholders are the model's tensors and the input ``x``.
    x: the placeholder of the input ``x (B, C, H, W)``.
    tensors: placeholder name -> the qualified name of the model's parameter or buffer it stands for, or the
        constant tensor itself (tensors the forward creates, plain tensor attributes).
    outputs: the nodes of the model's outputs, flattened (buffer updates of a training-mode model dropped).
    out_spec: how to put ``outputs`` back into the model's output structure (a tensor, tuple, dict, ModelOutput).
    bsym: the batch size symbol (sympy), or None when the capture fixed the batch size.
    batch: the captured batch size when ``bsym`` is None.
    returns: module path -> the node of the value it returns, for the modules whose call signature the capture was
        asked to keep (``preserve``): how a module that leaves no node of its own (``nn.Identity``, folded away)
        is found.
    """

    graph: fx.Graph
    x: fx.Node
    tensors: dict
    outputs: tuple
    out_spec: Any
    bsym: Any
    batch: int
    returns: dict = {}


class SplitArgs(NamedTuple):
    """What ``funcam.split`` was asked, checked: where to cut (``layer``: names, or None for the default cut),
    ``token_cut`` (None, "norm1" or "norm2"), ``tracer_leaves`` (classes FX's tracer keeps whole) and ``example``
    (an input to capture with now, or None). Every route (``funcam._src.cuts.route``) reads it."""

    layer: tuple[str, ...] | None = None
    token_cut: str | None = None
    tracer_leaves: tuple = ()
    example: Tensor | None = None


class CaptureError(ValueError):
    """The model's forward could not be captured as a graph."""


def example_batch(x: Tensor) -> Tensor:
    """Two images from ``x`` to capture with: a batch of 1 would fix the batch size, 0 cannot run every model."""
    if x.shape[0] >= 2:
        return x[:2]
    if x.shape[0] == 1:
        return torch.cat([x, x])
    return x.new_zeros((2,) + tuple(x.shape[1:]))


def capture(model: nn.Module, x: Tensor, preserve: Sequence[str] = ()) -> Captured:
    """``model.forward`` on inputs shaped like ``x (B, C, H, W)`` as a ``Captured`` graph (any batch size);
    ``preserve``: submodule paths whose returned value must be known even when their call leaves no node."""
    ex = example_batch(x.detach())
    with warnings.catch_warnings():
        # the capture traces the user's forward on fake tensors; its warnings are not the user's
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, (ex,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False,
                                     preserve_module_call_signature=tuple(preserve))
        except Exception as e:  # noqa: BLE001 - export raises many types for untraceable code
            raise CaptureError(f"could not capture {type(model).__name__} as a graph with torch.export "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    sig = ep.graph_signature
    tensors, x_node = {}, None
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in sig.input_specs:
        kind = spec.kind.name
        node = nodes[spec.arg.name]
        if kind == "USER_INPUT":
            x_node = node
        elif kind in ("PARAMETER", "BUFFER"):
            tensors[node.name] = spec.target
        elif kind == "CONSTANT_TENSOR":
            tensors[node.name] = ep.constants[spec.target]
        else:
            raise CaptureError(f"could not capture {type(model).__name__}: its graph has a {kind} input")
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    flat = out_node.args[0]
    user = tuple(flat[i] for i, s in enumerate(sig.output_specs) if s.kind.name == "USER_OUTPUT")
    out_spec = ep.module_call_graph[0].signature.out_spec
    s0 = x_node.meta["val"].shape[0]
    bsym = None if isinstance(s0, int) else s0.node.expr
    by_name = {n.name: n for n in ep.graph.nodes}
    returns = {}
    for entry in ep.module_call_graph:
        outs = entry.signature.outputs if entry.fqn in preserve and entry.signature is not None else []
        if len(outs) == 1 and getattr(outs[0], "name", None) in by_name:
            returns[entry.fqn] = by_name[outs[0].name]
    return Captured(ep.graph, x_node, tensors, user, out_spec, bsym, int(ex.shape[0]), returns)


def unflatten(cap: Captured, leaves: Any) -> Any:
    """The model's output structure from the flat output values."""
    return pytree.tree_unflatten(list(leaves), cap.out_spec)


def first_output(out: Any) -> Tensor:
    """The model's main output: the tensor itself, a tuple's first element, a dict's first value
    (torchvision segmentation's ``out``), a Hugging Face ``ModelOutput``'s first field (``logits``)."""
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
    if not leaves:
        raise ValueError(f"the model returned no tensor ({type(out).__name__})")
    return leaves[0]


class Bound(NamedTuple):
    """A graph over the model's tensors: ``gm(*model_tensors, *inputs)``; ``fetch(model)`` gives the tensors."""

    gm: fx.GraphModule
    names: tuple  # per leading placeholder: a parameter/buffer name, or a constant tensor

    def fetch(self, model: nn.Module) -> list:
        return [_tensor(model, n) if isinstance(n, str) else n for n in self.names]


def _tensor(model: nn.Module, name: str) -> Tensor:
    # an attribute lookup, not get_parameter: functional_call swaps plain tensors in for the parameters
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


def build(cap: Captured, graph: fx.Graph, name: str) -> Bound:
    """``graph`` (whose first placeholders are the model's tensors, as ``copy_node`` made them) as a ``Bound``."""
    leading = [n for n in graph.nodes if n.op == "placeholder" and n.meta.get("funcam_tensor") is not None]
    return Bound(fx.GraphModule({}, graph, name), tuple(cap.tensors[n.meta["funcam_tensor"]] for n in leading))


def copy_node(graph: fx.Graph, node: fx.Node, env: dict, cap: Captured) -> fx.Node:
    """Copy ``node`` into ``graph``; the model's tensors become leading placeholders, created on first use."""
    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "placeholder" and n.name in cap.tensors:
                first = next(iter(graph.nodes), None)
                if first is None:
                    env[n] = graph.placeholder(n.name)
                else:
                    with graph.inserting_before(_first_non_tensor(graph)):
                        env[n] = graph.placeholder(n.name)
                env[n].meta = dict(n.meta, funcam_tensor=n.name)
            else:
                raise KeyError(n.name)
        return env[n]

    new = graph.node_copy(node, arg)
    new.meta = dict(node.meta)
    return new


def scopes(node: fx.Node) -> list[tuple[str, str, str]]:
    """(call key, module path, class name) of the modules ``node`` runs inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, cls) in stack.items():
        if path:
            out.append((key, path, cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))))
    return out


def _first_non_tensor(graph: fx.Graph) -> fx.Node:
    """The first node that is not one of the model's tensors: new tensor placeholders go before it."""
    for n in graph.nodes:
        if not (n.op == "placeholder" and n.meta.get("funcam_tensor") is not None):
            return n
    return graph._root  # noqa: SLF001 - an empty graph's sentinel: inserting before it appends


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


def declared_in_chans(model: nn.Module) -> int | None:
    """The input channels the model declares (timm's ``in_chans``, Hugging Face ``config.num_channels``), else the
    first convolution's (torchvision stems); a space-to-depth stem (TResNet) declares its own."""
    for v in (getattr(model, "in_chans", None), getattr(getattr(model, "config", None), "num_channels", None)):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None
