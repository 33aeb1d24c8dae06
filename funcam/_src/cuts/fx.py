"""Cut any traceable ``nn.Module`` after named submodules or FX nodes, without hooks.

The model is traced once with ``torch.fx``; two new graphs are built over the same submodules (the
GraphModules reference the user's modules, nothing is copied or changed):

* extract: the nodes needed to compute the cut values; returns ``Features(maps, context)`` where
  ``context`` holds the values computed before the first cut that the rest of the graph still reads
  (skip connections over the cut).
* head: every node after the first cut. Later cuts are recomputed from the first one, and ``maps[i]``
  (``i >= 1``) enters as a zero-valued tap ``r + (m - m.detach())``: its value is the recomputed ``r``
  (so ``head(extract(x)) == model(x)``), its gradient is the gradient at that cut, and the gradient at the
  first cut is the total derivative through the later ones (as a backward pass through the whole model
  gives). The engine feeds ``maps[1:]`` detached so outer autograd does not count them twice.
"""
from __future__ import annotations

import difflib
from typing import Callable, Sequence

import torch.fx as fx
from torch import Tensor, nn

from funcam._src.base import Features
from funcam._src.cuts.graph import cut_graphs
from funcam._src.cuts.pooled import pools_first


def suggest_names(model: nn.Module, name: str, extra: Sequence[str] = ()) -> list[str]:
    """Submodule (and extra node) names nearest to ``name``, for error messages."""
    names = [n for n, _ in model.named_modules() if n] + list(extra)
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    return close or names[-8:]


class _Tracer(fx.Tracer):
    """Treats timm's non-traceable layers (and any extra classes) as leaves."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__(autowrap_functions=_timm_autowrap())
        self._leaves = leaves + _timm_leaves()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _timm_leaves() -> tuple[type, ...]:
    try:
        from timm.layers._fx import get_notrace_modules
        return tuple(get_notrace_modules())
    except ImportError:
        return ()


def _timm_autowrap() -> tuple[Callable, ...]:
    try:
        from timm.layers._fx import get_notrace_functions
        return tuple(get_notrace_functions())
    except ImportError:
        return ()


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # FX raises many types (TraceError, TypeError, ...) for data-dependent code
        raise ValueError(
            f"split: could not trace {type(model).__name__} with torch.fx to cut it at a layer ({type(e).__name__}:"
            f" {e}). Pass tracer_leaves=(ModuleClass, ...) for the submodules that do not trace, or build "
            f"funcam.Split(extract, head) by hand") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _find(gm: fx.GraphModule, model: nn.Module, name: str) -> fx.Node:
    by_module = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    if len(by_module) > 1:
        raise ValueError(f"split: layer {name!r} is called {len(by_module)} times in the forward; cut at one "
                         f"call by its FX node name instead: {[n.name for n in by_module]}")
    if by_module:
        return by_module[0]
    by_name = [n for n in gm.graph.nodes if n.name == name and n.op not in ("placeholder", "output")]
    if by_name:
        return by_name[0]
    # A container traced through (Sequential, a ResNet stage) has no node of its own: its output is the
    # last node recorded inside it.
    inside = [n for n in gm.graph.nodes if name in (n.meta.get("nn_module_stack") or {})]
    if inside:
        return inside[-1]
    if any(n == name for n, _ in model.named_modules()):
        raise ValueError(f"split: layer {name!r} is a submodule that is not called as a whole in the traced "
                         f"forward (it sits inside a traced leaf or is unused); cut at a node near it: "
                         f"{suggest_names(model, name, [n.name for n in gm.graph.nodes])}")
    raise ValueError(f"split: unknown layer {name!r}; nearest valid names: "
                     f"{suggest_names(model, name, [n.name for n in gm.graph.nodes])}")


def fx_split(model: nn.Module, names: list[str], *, tracer_leaves: tuple[type, ...] = ()
             ) -> tuple[Callable, Callable, tuple[str, ...], bool]:
    """``(extract, head, names in graph order, pools)`` for cuts after ``names``; pools: one cut, and every use of
    it is a global average over its grid (``funcam._src.cuts.pooled.pools_first``; NCHW assumed, as FX cannot tell)."""
    gm = trace(model, tracer_leaves)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = {_find(gm, model, name): name for name in names}
    cuts = sorted(found, key=order.__getitem__)
    if len(cuts) != len(names):
        raise ValueError(f"split: layer names {names} name the same node more than once")
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"split: the model's forward takes {len(inputs)} inputs; funcam cuts models of one "
                         f"input x (B, C, H, W)")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    g_ex, g_hd, _ = cut_graphs(nodes, cuts, None, lambda g, n, env: g.node_copy(n, env.__getitem__),
                               output.args[0])
    extract_gm = fx.GraphModule(gm, g_ex, "extract")
    head_gm = fx.GraphModule(gm, g_hd, "head")
    chained = len(cuts) > 1

    def extract(x: Tensor) -> Features:
        """x (B, C, H, W) -> Features(maps=(A_i (B, C_i, h_i, w_i), ...), context)."""
        maps, ctx = extract_gm(x)
        return Features(tuple(maps), tuple(ctx), chained)

    def head(feats: Features) -> Tensor:
        """Features -> logits (B, num_classes)."""
        return head_gm(*feats.maps, *feats.context)

    return extract, head, tuple(found[c] for c in cuts), len(cuts) == 1 and pools_first(cuts[0], model=gm)
