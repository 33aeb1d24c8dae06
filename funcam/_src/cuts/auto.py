"""The graph route: any model, cut from its captured graph, checked on first use for each input size.

One ``GraphCut`` per split. The graph is captured per input signature (height, width, dtype, device, the
modules' training flags) the first time ``extract`` sees it; the batch size is symbolic, so batches of any size
share it. Each new capture is checked once, at the example input, before it is used:

* ``head(extract(x))`` equals ``model(x)`` (the real forward, every output tensor);
* the gradient of the model's first output reaches the cut at grid positions (else every map would be zero);
* the map's grid has the input's aspect ratio (a misread layout would not).

``extract`` puts the signature's key first in ``Features.context``; ``head`` finds its graph by it.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.base import Features, Pooled, Split
from funcam._src.cuts.attention import Source, calls_attention, graph_attention, no_attention_error
from funcam._src.cuts.capture import CaptureError, SplitArgs, capture, declared_in_chans, default_example, example_batch
from funcam._src.cuts.fx import fx_split
from funcam._src.cuts.graph import Cut, cut_graph, default_cut, find, name_of, probe, silent_modules
from funcam._src.cuts.layout import propagate
from funcam._src.cuts.pooled import bound, cut_averages_first, pools_first, splits_at


class Entry(NamedTuple):
    extract: Callable[[Tensor], Features]
    head: Callable[[Features], Any]
    layers: tuple[str, ...]
    pooled: bool = False  # the head starts with global average pooling (``funcam._src.cuts.pooled``)
    pre: Callable[[Features], Any] | None = None  # with pooled: the head up to the final Linear's input
    classifier: nn.Module | None = None  # that Linear


def signature(model: nn.Module, x: Tensor) -> tuple:
    """What a captured graph is specific to: input size, dtype, device and the modules' training flags."""
    return (tuple(x.shape[1:]), x.dtype, x.device.type, x.device.index,
            tuple(m.training for m in model.modules()))


class GraphCut:
    """extract / head over per-signature captures of ``model`` cut at ``names`` (None: the default cut)."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None):
        self.model = model
        self.names = None if names is None else list(names)
        self._entries: dict[tuple, Entry] = {}
        self._lock = threading.Lock()

    def entry(self, x: Tensor) -> tuple[tuple, Entry]:
        key = signature(self.model, x)
        e = self._entries.get(key)
        if e is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "funcam: this split captures its graph on first use for each input size, which cannot happen "
                    "inside torch.compile; call it once eagerly on an input of this size first (or build it with "
                    "funcam.split(model, example=x))")
            with self._lock:
                e = self._entries.get(key)
                if e is None:
                    e = self._entries[key] = build_entry(self.model, x, self.names)
        return key, e

    def attention(self, x: Tensor) -> Any:
        """The model's attentions with taps (``funcam._src.cuts.attention.GraphAttention``) for x's signature."""
        key = ("attention",) + signature(self.model, x)
        a = self._entries.get(key)
        if a is None:
            if torch.compiler.is_compiling():
                raise RuntimeError("funcam: call this relevance function once eagerly on an input of this size "
                                   "before compiling it (its graph is captured on first use)")
            with self._lock:
                a = self._entries.get(key)
                if a is None:
                    if not calls_attention(self.model, x):
                        raise no_attention_error(self.model)
                    cap = capture(self.model, x)
                    ex = probe_input(x)
                    roles = propagate(cap.graph, cap.x, cap.bsym)
                    a = self._entries[key] = graph_attention(cap, roles, self.model, ex)
        return a

    def pooled(self, feats: Features) -> Pooled | None:
        """``Pooled`` for the head that ``feats`` (from ``extract``) go to, when that capture's head starts with global
        average pooling and reads no tensor from before the cut; else None. Each capture was checked when it was made,
        so this only looks it up: ``Split.pooled`` of a graph-route split is this function."""
        key, *ctx = feats.context
        e = self._entries.get(key)
        if e is None or not e.pooled or len(feats.maps) != 1 or any(isinstance(c, Tensor) for c in ctx):
            return None
        return bound(e.head, tuple(ctx)) if e.pre is None else bound(e.pre, tuple(ctx), e.classifier)

    def extract(self, x: Tensor) -> Features:
        """x (B, C, H, W) -> Features(maps, context=(key, ...)) from the graph captured for x's signature."""
        key, e = self.entry(x)
        f = e.extract(x)
        return Features(f.maps, (key,) + tuple(f.context), f.chained)

    def head(self, feats: Features) -> Any:
        """Features -> the model's output, through the graph that ``extract`` used."""
        key, *ctx = feats.context
        return self._entries[key].head(Features(feats.maps, tuple(ctx), feats.chained))


def widened(pr: Any, cap: Any, model: nn.Module, x: Tensor, enough: Callable[[Any], bool]) -> Any:
    """``pr`` with the values reached by the gradient on more inputs than the random probe, until ``enough(pr)``:
    the input the model is being explained on (``x``, the user's own: a ReLU network whose biases are far below
    zero passes no gradient for small random inputs, but does for its real ones), then random inputs scaled by
    10 and 100. A value none of them reaches at any grid position is structurally cut off from the output (the
    CLS trap, a head that ignores the cut), which is what the first-use check refuses; a zero gradient on one
    input is only that input's zero map."""
    for alt in (x.detach(), 10 * probe_input(x), 100 * probe_input(x)):
        if enough(pr):
            break
        pr = pr._replace(reaching=pr.reaching | probe(cap, example_batch(alt), model).reaching)
    return pr


def probe_input(x: Tensor) -> Tensor:
    """Two random images shaped like ``x`` to probe and check a capture with: the caller's own images may be
    degenerate (the blank image of a dry run, the zero image standing in for an empty batch) and make a gradient
    vanish that is not structurally zero."""
    g = torch.Generator().manual_seed(0)
    return torch.randn((2,) + tuple(x.shape[1:]), generator=g, dtype=torch.float64).to(x.device, x.dtype)


def build_entry(model: nn.Module, x: Tensor, names: Sequence[str] | None) -> Entry:
    """Capture, cut and check ``model`` for inputs shaped like ``x`` (see the module docstring). A named cut of a
    model that ``torch.export`` cannot capture falls back to ``torch.fx`` (feature maps assumed NCHW, as FX
    cannot tell), and fails with the capture's error when FX cannot trace it either."""
    try:
        cap = capture(model, x)
    except CaptureError as e:
        if names is None:
            raise
        try:
            extract, head, ordered, pools = fx_split(model, list(names))
        except ValueError:
            raise e from None
        return Entry(extract, head, ordered, pools and cut_averages_first(extract, head, probe_input(x)))
    module_names = [n for n, _ in model.named_modules() if n]
    silent = silent_modules(cap, names or (), module_names)
    if silent:  # captured again, keeping what those modules return (nn.Identity leaves no node of its own)
        cap = capture(model, x, preserve=silent)
    ex = probe_input(x)
    pr = probe(cap, ex, model)
    if names is None:
        try:
            nodes = [default_cut(cap, pr)]
        except ValueError:
            pr = widened(pr, cap, model, x, lambda p: bool(set(p.reaching) & set(p.learned)))
            try:
                nodes = [default_cut(cap, pr)]
            except ValueError as e:
                raise ValueError(f"split: no default cut for {type(model).__name__}: {e}"
                                 f"{_guard.zero_weights_hint(model)}") from None
    else:
        found = {find(cap, name, module_names): name for name in names}
        if len(found) != len(names):
            raise ValueError(f"split: layer names {list(names)} name the same value more than once")
        order = {n: i for i, n in enumerate(cap.graph.nodes)}
        nodes = sorted(found, key=order.__getitem__)
        for n in nodes:
            if n not in pr.layouts:
                shape = tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), Tensor) else None
                raise ValueError(
                    f"split: layer {found[n]!r} gives a value of shape {shape} whose axes funcam cannot place on "
                    f"the input's grid (a feature map (B, C, h, w) or (B, h, w, C), or tokens (B, N, C) of a "
                    f"patch grid); cut at a layer whose output is one")
        if any(n not in pr.reaching for n in nodes):
            pr = widened(pr, cap, model, x, lambda p: all(n in p.reaching for n in nodes))
    lays = tuple(pr.layouts[n] for n in nodes)
    layers = tuple(name_of(cap, n) if names is None else found[n] for n in nodes)
    extract, head = cut_graph(cap, Cut(tuple(nodes), lays, layers), model)
    _check(model, ex, extract, head, pr, nodes, layers, lays)
    # the pooled fast path: the graph says the cut is only averaged over its grid, the numbers confirm it
    val = nodes[0].meta.get("val")
    pooled = (len(nodes) == 1 and lays[0].token is None and isinstance(val, Tensor)
              and pools_first(nodes[0], (lays[0].row, lays[0].col), val.ndim)
              and cut_averages_first(extract, head, ex))
    if not pooled:
        return Entry(extract, head, layers)
    found = final_linear(cap, model)
    if found is not None:
        _, pre = cut_graph(cap, Cut(tuple(nodes), lays, layers), model, until=found[0])
        if splits_at(head, pre, found[1], extract, ex):
            return Entry(extract, head, layers, True, pre, found[1])
    return Entry(extract, head, layers, True)


def final_linear(cap: Any, model: nn.Module) -> tuple[Any, nn.Linear] | None:
    """(its input node, the module) when the model's one output is an ``nn.Linear`` of the model's own, by the
    graph: ``linear(v, W, b)`` with W and b that module's parameters. Then the pooled fast path takes the
    gradient at v from W's rows (no (K, B, N) x (N, D) product)."""
    if len(cap.outputs) != 1 or not isinstance(cap.outputs[0], fx.Node):
        return None
    out = cap.outputs[0]
    if getattr(out.target, "__name__", "").split(".")[0] != "linear" or len(out.args) < 2:
        return None
    v, w, b = out.args[0], out.args[1], out.args[2] if len(out.args) > 2 else None
    wname = cap.tensors.get(getattr(w, "name", None))
    if not isinstance(wname, str) or not wname.endswith(".weight") or not isinstance(v, fx.Node):
        return None
    path = wname[:-len(".weight")]
    mod = model.get_submodule(path)
    bname = cap.tensors.get(getattr(b, "name", None)) if b is not None else None
    if not isinstance(mod, nn.Linear) or (mod.bias is None) != (b is None) or (
            b is not None and bname != path + ".bias"):
        return None
    return v, mod


def _check(model: nn.Module, ex: Tensor, extract: Callable, head: Callable, pr: Any, nodes: list, layers: tuple,
           lays: tuple) -> None:
    # the same random stream for both, so that a training-mode model's dropout draws the same masks
    devices = [ex.device] if ex.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        want = model(ex)
        torch.manual_seed(0)
        got = head(extract(ex))
    wl = [t for t in pytree.tree_leaves(want) if isinstance(t, Tensor)]
    gl = [t for t in pytree.tree_leaves(got) if isinstance(t, Tensor)]
    tol = max(1e-4, 16 * torch.finfo(ex.dtype).eps)  # low precision: the graph's ops round as the model's do,
    # up to the attention it computes explicitly
    if len(wl) != len(gl) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol)
                                 for a, b in zip(wl, gl) if a.is_floating_point()):
        raise ValueError(f"split: the graph captured from {type(model).__name__} does not reproduce model(x) "
                         f"(cut at {list(layers)}); the forward may depend on values or state that the capture "
                         f"fixed. Build funcam.Split(extract, head) by hand for this model")
    for n, name, lay in zip(nodes, layers, lays):
        if n not in pr.reaching:
            raise ValueError(
                f"split: the gradient of the model's output w.r.t. {name!r} is exactly zero at every grid position "
                f"for every input tried (yours, and random ones at three scales), so every map would be zero: the "
                f"output does not depend on the positions there (e.g. after the last attention of a CLS-pooled "
                f"transformer only the CLS token matters; cut before it), or the weights after it are zero"
                f"{_guard.zero_weights_hint(model)}")
        h, w = ex.shape[-2:]
        gh, gw = lay.grid
        sh, sw = h / gh, w / gw
        if max(sh, sw) > 2 * min(sh, sw) and min(gh, gw) > 1:
            raise ValueError(f"split: the map at {name!r} has a {gh}x{gw} grid for a {h}x{w} input: its axes do not "
                             f"follow the input's; pass another layer=")


# --- the graph route: any model, last in the route table ------------------------------------------------------------

def applies(model: nn.Module, args: SplitArgs) -> bool:
    """Any model, unless ``token_cut=`` asks for a transformer-block cut (the ViT and Swin routes' own)."""
    return args.token_cut is None


def split(model: nn.Module, args: SplitArgs) -> Split:
    """The graph route: named cuts (submodule paths or node names, any layout) or the default cut, from the graph
    ``torch.export`` captures (once per input size; ``GraphCut``). FX node names (``layer4_1_relu_1``) and
    ``tracer_leaves`` are ``torch.fx``'s, which serves every input size with one trace; a model ``torch.export`` cannot
    capture falls back to ``torch.fx`` for named cuts (``build_entry``): the FX decision lives here and there only."""
    in_chans = declared_in_chans(model)
    names = list(args.layer) if args.layer is not None else None
    if names is not None and (args.tracer_leaves or not all(n in _module_names(model) for n in names)):
        try:
            extract, head, ordered, pools = fx_split(model, names, tracer_leaves=args.tracer_leaves)
            return Split(extract, head, in_chans, ordered,
                         _fx_pooled(model, extract, head, pools, args.example, in_chans))
        except ValueError as e:
            if args.tracer_leaves or "could not trace" not in str(e):
                raise  # an unknown name, or the escape hatch for FX's tracer was asked for
    gc = GraphCut(model, names)
    # several names need the graph now: their maps come in graph order, which ``layers`` reports. One name is
    # captured on first use; whether each capture's head pools first is then known only there, so ``pooled`` is
    # the lookup ``gc.pooled`` (None for a capture that does not), and ``example=`` settles it now.
    if names is not None and len(names) == 1 and args.example is None:
        return Split(gc.extract, gc.head, in_chans, tuple(names), gc.pooled, graph=gc)
    x = args.example if args.example is not None else default_example(model, in_chans)
    with torch.no_grad(), warnings.catch_warnings():
        # a training-mode model is captured as it is (batch statistics, dropout); the entry points warn
        warnings.simplefilter("ignore", _guard.TrainingModeWarning)
        _, entry = _guard.run(model, lambda: gc.entry(x))
    return Split(gc.extract, gc.head, in_chans, entry.layers, gc.pooled if entry.pooled else None, graph=gc)


def attention(model: nn.Module, x: Tensor, graph: GraphCut | None = None) -> Source:
    """The attentions of any transformer, found in its captured graph (``GraphCut.attention``); ``graph``: a split's
    own, to reuse its capture."""
    ga = _guard.run(model, lambda: (graph or GraphCut(model, None)).attention(x))
    return Source(ga.run, ga.taps, len(ga.names), ga.readout.to(device=x.device, dtype=x.dtype), ga.prefix, ga.grid,
                  model)


def _module_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules() if n}


def _fx_pooled(model: nn.Module, extract: Any, head: Any, pools: bool, example: Tensor | None,
               in_chans: int | None) -> Pooled | None:
    """``Pooled`` for an FX cut whose head starts with global average pooling (``funcam._src.cuts.pooled``), else None.
    The FX graph serves every input size, so one numeric check, at ``example`` or the model's configured size,
    decides for all of them."""
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
