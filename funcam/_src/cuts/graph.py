"""Cut a captured graph (``funcam._src.cuts.capture``) after one or more values, and find the default cut.

Two graphs are built over the model's own tensors:

* extract: the nodes needed for the cut values; returns them as ``(B, C, h, w)`` maps (whatever their layout:
  NCHW, NHWC, tokens with prefix tokens; ``funcam._src.cuts.layout``) and, in ``Features.context``, the values that
  the rest of the graph reads from before the cut (skips over the cut, the input ``x`` itself, shapes as
  integers, the prefix tokens of a token cut). Context is held constant when differentiating.
* head: every node after the first cut; later cuts are recomputed from the first and enter as zero-valued taps
  ``r + (m - m.detach())`` (value r, gradient at that cut), as in a multi-layer backward pass.

The default cut (``default_cut``) is the last value on the input's grid whose gradient from the model's first
output is non-zero at grid positions and that reaches the output through a layer with parameters or a pooling
(so a dense output's own upsampling is not a feature). When that value sits inside an attention module whose
outputs no longer reach the output at grid positions (the last attention of a CLS-pooled transformer: after it
only the CLS row matters), the cut moves to that module's input: the feature before the last token mixing.
"""
from __future__ import annotations

import difflib
import operator
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx
from einops import rearrange
from torch import Tensor, nn

from funcam._src.base import Features
from funcam._src.cuts.attention import unfuse_attention
from funcam._src.cuts.capture import Captured, build, copy_node, first_output, scopes, unflatten
from funcam._src.cuts.layout import Layout, layout_of, propagate


class Cut(NamedTuple):
    """Cut values of a captured graph, in graph order, with their layouts and names."""

    nodes: tuple
    layouts: tuple
    names: tuple


# --- layouts <-> maps ----------------------------------------------------------------------------------------------

def to_map(v: Tensor, lay: Layout) -> tuple[Tensor, Tensor | None]:
    """A cut value in its own layout -> (map (B, C, h, w), prefix tokens (B, p, C) or None)."""
    if lay.token is None:
        return v.permute(lay.batch, lay.channel, lay.row, lay.col), None
    t = v.permute(lay.batch, lay.token, lay.channel)  # (B, N, C)
    gh, gw = lay.grid
    fmap = rearrange(t[:, lay.prefix:], "b (h w) c -> b c h w", h=gh, w=gw)
    return fmap, (t[:, :lay.prefix] if lay.prefix else None)


def from_map(fmap: Tensor, prefix: Tensor | None, lay: Layout) -> Tensor:
    """Inverse of ``to_map``: map (B, C, h, w) and prefix (B, p, C) -> the value in the cut's own layout."""
    if lay.token is None:
        order = (lay.batch, lay.channel, lay.row, lay.col)
    else:
        t = rearrange(fmap, "b c h w -> b (h w) c")
        if lay.prefix:
            if prefix is None:  # a tap: its value never matters, only its gradient at the grid positions
                prefix = t.new_zeros((t.shape[0], lay.prefix, t.shape[2]))
            t = torch.cat([prefix, t], dim=1)
        fmap, order = t, (lay.batch, lay.token, lay.channel)
    inverse = [order.index(i) for i in range(len(order))]
    return fmap.permute(*inverse)


def tap(r: Tensor, m: Tensor) -> Tensor:
    """A later cut's value in the head: ``r`` (recomputed), with the gradient at the tap ``m``."""
    return r + (m - m.detach())


def clone_value(v: Any) -> Any:
    """What the head is given, cloned: it may write into it (an in-place ReLU after the cut); a shape or other plain
    value read before the cut is a constant, not a tensor to copy."""
    return v.clone() if isinstance(v, Tensor) else v


# --- graph surgery ---------------------------------------------------------------------------------------------------

def _view_source(node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node`` aliases (a view op's input, an in-place op's target), else None."""
    if node.target is operator.getitem:
        src = node.args[0]
        return src if isinstance(src, fx.Node) and _view_source(src) is not None else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    want = schema.returns[0].alias_info.before_set
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.before_set == want and i < len(node.args):
            return node.args[i] if isinstance(node.args[i], fx.Node) else None
    return None


def _writes(node: fx.Node) -> list[fx.Node]:
    """The arguments an in-place op writes into (``add_``, ``fill_``, ``copy_`` into a slice, ...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    return [node.args[i] for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write and i < len(node.args)
            and isinstance(node.args[i], fx.Node)]


def dependencies(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Each node's inputs plus the in-place writes that must run before it reads their storage.

    An in-place write (``mask[a:b] = 1`` is ``fill_`` on a slice) has no user of its own, so following inputs
    alone would drop it and read the storage unwritten; any later reader of that storage depends on it.
    """
    base: dict[fx.Node, fx.Node] = {}
    writers: dict[fx.Node, list[fx.Node]] = {}
    deps: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        src = _view_source(n) if n.op == "call_function" else None
        base[n] = base.get(src, src) if src is not None else n
        extra = []
        for a in n.all_input_nodes:
            extra.extend(w for w in writers.get(base.get(a, a), []) if w is not n)
        deps[n] = list(n.all_input_nodes) + extra
        if n.op == "call_function":
            for a in _writes(n):
                writers.setdefault(base.get(a, a), []).append(n)
    return deps


def ancestors(nodes: Sequence[fx.Node], deps: dict[fx.Node, list[fx.Node]] | None = None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(deps[n] if deps is not None else n.all_input_nodes)
    return seen


def cut_graphs(nodes: Sequence[fx.Node], cuts: Sequence[fx.Node], deps: dict[fx.Node, list[fx.Node]] | None,
               copy: Callable[[fx.Graph, fx.Node, dict], fx.Node], outputs: Any) -> tuple[fx.Graph, fx.Graph, int]:
    """The two graphs of a cut after ``cuts`` (in graph order) of a graph whose ``nodes`` (its output excluded) are
    given in order; ``copy(graph, node, env)`` copies one node; ``outputs``: the head's output (nodes in a structure
    ``fx.map_arg`` walks).

    extract: ``x -> (cut values, context)``, context being the values from before the first cut that the rest reads
    (skips over the cut, ``x`` itself, shapes). head: ``(cut values..., *context) -> outputs``: every node after the
    first cut; later cuts are recomputed and enter as zero-valued taps (value recomputed, gradient at that cut).
    Returns (extract graph, head graph, number of context values). The one cutting algorithm of both graph routes
    (``torch.export``'s ATen graph here, ``torch.fx``'s in ``funcam._src.cuts.fx``).
    """
    first = cuts[0]
    before = ancestors([first], deps)
    after = [n for n in nodes if n not in before]
    read = set()
    fx.map_arg(outputs, read.add)
    context = [n for n in nodes if n in before and n is not first
               and (n in read or any(u not in before and u.op != "output" for u in n.users))]

    g_ex = fx.Graph()
    env: dict = {}
    needed = ancestors(list(cuts), deps) | before
    for n in nodes:
        if n in needed:
            env[n] = copy(g_ex, n, env)
    g_ex.output((tuple(env[c] for c in cuts), tuple(env[c] for c in context)))

    g_hd = fx.Graph()
    env = {}
    ins = [g_hd.placeholder(f"cut_{i}") for i in range(len(cuts))]
    # the head's inputs are cloned: the model may write into a cut value in place (a conv followed by
    # ReLU(inplace=True)), which would corrupt the map and is refused on vjp's differentiable input
    env[first] = g_hd.call_function(clone_value, (ins[0],))
    for c in context:
        env[c] = g_hd.call_function(clone_value, (g_hd.placeholder(f"ctx_{c.name}"),))
    for n in after:
        env[n] = copy(g_hd, n, env)
        if n in cuts:
            env[n] = g_hd.call_function(tap, (env[n], ins[list(cuts).index(n)]))
    g_hd.output(fx.map_arg(outputs, env.__getitem__))
    return g_ex, g_hd, len(context)


def cut_graph(cap: Captured, cut: Cut, model: nn.Module, until: fx.Node | None = None
              ) -> tuple[Callable[[Tensor], Features], Callable[[Features], Any]]:
    """``(extract, head)`` for ``cut``: extract(x) -> Features; head(Features) -> the model's output (or, with
    ``until``, that node's value: the input of a final classifier). Both read ``model``'s tensors when called."""
    tensors = set(cap.tensors)
    nodes = [n for n in cap.graph.nodes if n.op != "output" and not (n.op == "placeholder" and n.name in tensors)]
    outs = tuple(cap.outputs if until is None else (until,))
    g_ex, g_hd, _ = cut_graphs(nodes, cut.nodes, dependencies(cap.graph), lambda g, n, env: copy_node(g, n, env, cap),
                               outs)
    ex_gm = build(cap, g_ex, "extract")
    hd_gm = build(cap, unfuse_attention(g_hd), "head")
    lays = cut.layouts
    chained = len(cut.nodes) > 1

    def extract(x: Tensor) -> Features:
        """x (B, C, H, W) -> Features(maps=((B, C_i, h_i, w_i), ...), context=(prefix, *skips))."""
        vals, ctx = ex_gm.gm(*ex_gm.fetch(model), x)
        m0, prefix = to_map(vals[0], lays[0])
        maps = (m0,) + tuple(to_map(v, lay)[0] for v, lay in zip(vals[1:], lays[1:]))
        return Features(maps, (prefix,) + tuple(ctx), chained)

    def head(feats: Features) -> Any:
        """Features -> the model's output (logits, a dict, a ModelOutput, ...)."""
        prefix, *ctx = feats.context
        v0 = from_map(feats.maps[0], prefix, lays[0])
        taps = [from_map(m, None, lay) for m, lay in zip(feats.maps[1:], lays[1:])]
        out = hd_gm.gm(*hd_gm.fetch(model), v0, *taps, *ctx)
        return unflatten(cap, out) if until is None else out[0]

    return extract, head


# --- names ------------------------------------------------------------------------------------------------------

def _in_scope(node: fx.Node, key: str) -> bool:
    return key in (node.meta.get("nn_module_stack") or {})


def module_outputs(cap: Captured, key: str) -> list[fx.Node]:
    """The values a module call hands to the rest of the graph."""
    inside = [n for n in cap.graph.nodes if n.op == "call_function" and _in_scope(n, key)]
    return [n for n in inside if any(not _in_scope(u, key) for u in n.users)]


def module_inputs(cap: Captured, key: str) -> list[fx.Node]:
    """The values from outside a module call that its nodes read (the model's tensors excluded)."""
    inside = [n for n in cap.graph.nodes if n.op == "call_function" and _in_scope(n, key)]
    seen: list[fx.Node] = []
    for n in inside:
        for a in n.all_input_nodes:
            if not _in_scope(a, key) and a.name not in cap.tensors and a not in seen:
                seen.append(a)
    return seen


def name_of(cap: Captured, node: fx.Node) -> str:
    """The outermost module whose output is ``node`` (``"layer4"``, ``"blocks.11.norm1"``), else the node name."""
    for key, path, _ in scopes(node):
        if module_outputs(cap, key) == [node]:
            return path
    return node.name


def find(cap: Captured, name: str, module_names: Sequence[str]) -> fx.Node:
    """The node a ``layer=`` name refers to: a submodule's output (the path from ``named_modules``) or a node name."""
    calls: dict[str, list[str]] = {}
    for n in cap.graph.nodes:
        for key, path, _ in scopes(n):
            if path == name and key not in calls.setdefault(path, []):
                calls[path].append(key)
    keys = calls.get(name, [])
    if len(keys) > 1:
        raise ValueError(f"split: layer {name!r} is called {len(keys)} times in the forward; cut at one call by a "
                         f"node name instead: {[name_of(cap, module_outputs(cap, k)[-1]) for k in keys]}")
    if keys:
        outs = [o for o in module_outputs(cap, keys[0]) if isinstance(o.meta.get("val"), Tensor)]
        if len(outs) != 1:
            raise ValueError(f"split: layer {name!r} hands {len(outs)} values to the rest of the model "
                             f"({[o.name for o in outs]}); cut at one of them by name")
        return outs[0]
    by_name = [n for n in cap.graph.nodes if n.name == name and n.op == "call_function"]
    if by_name:
        return by_name[0]
    if name in cap.returns and cap.returns[name].op == "call_function":
        return cap.returns[name]  # a module the capture folded away (nn.Identity): the value it returns
    if name in module_names:
        raise ValueError(f"split: layer {name!r} is a submodule that does not run in the forward (unused, or it "
                         f"only holds parameters), or returns the input x itself; cut at a module that runs, e.g. "
                         f"{_suggest(name, module_names, cap)}")
    raise ValueError(f"split: unknown layer {name!r}; nearest valid names: {_suggest(name, module_names, cap)}")


def _suggest(name: str, module_names: Sequence[str], cap: Captured) -> list[str]:
    names = list(module_names) + [n.name for n in cap.graph.nodes if n.op == "call_function"]
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    return close or list(module_names)[-8:]


# --- the default cut --------------------------------------------------------------------------------------------------

class Probe(NamedTuple):
    """What one forward and backward of the captured graph tells about its values (at the example input).

    roles: axis roles of every node (``funcam._src.cuts.layout``); layouts: node -> Layout for the values on the grid;
    reaching: the grid values whose gradient from the first output is non-zero at some grid position;
    learned: nodes from which the first output is reached through a layer with parameters or an op that leaves
        the grid (``_informative``).
    output: the model's output at the example input (from the graph).
    """

    roles: dict
    layouts: dict
    reaching: set
    learned: set
    output: Any


def probe(cap: Captured, x: Tensor, model: nn.Module) -> Probe:
    roles = propagate(cap.graph, cap.x, cap.bsym)
    layouts = {}
    for n in cap.graph.nodes:
        val, r = n.meta.get("val"), roles.get(n)
        if n.op == "call_function" and isinstance(val, Tensor) and isinstance(r, list) and val.is_floating_point():
            lay = layout_of(r, val.shape)
            if lay is not None and lay.grid[0] * lay.grid[1] > 0:
                layouts[n] = lay
    cands = list(layouts)
    g = fx.Graph()
    env: dict = {}
    for n in cap.graph.nodes:
        if n.op == "output":
            continue
        if n is cap.x:
            env[n] = g.placeholder("x")
            continue
        if n.op == "placeholder":
            continue
        env[n] = copy_node(g, n, env, cap)
    g.output((tuple(env[o] for o in cap.outputs), tuple(env[c] for c in cands)))
    gm = build(cap, g, "probe")
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outs, vals = gm.gm(*gm.fetch(model), xg)
        out = unflatten(cap, outs)
        main = first_output(out)
        if not main.is_floating_point():
            raise ValueError(f"the model's first output has dtype {main.dtype}; funcam explains floating outputs")
        cot = torch.randn(main.shape, generator=torch.Generator().manual_seed(0), dtype=main.dtype).to(main.device)
        live = [(c, v) for c, v in zip(cands, vals) if isinstance(v, Tensor) and v.requires_grad]
        grads = torch.autograd.grad(main, [v for _, v in live], cot, allow_unused=True) if live else ()
    reaching = set()
    for (c, _), gr in zip(live, grads):
        if gr is not None:
            gmap, _ = to_map(gr, layouts[c])
            if bool(torch.any(gmap != 0)):
                reaching.add(c)
    main_node = _first_output_node(cap)
    return Probe(roles, layouts, reaching, _informative(cap, roles, main_node), out)


def _first_output_node(cap: Captured) -> fx.Node:
    leaves = [o for o in cap.outputs if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), Tensor)]
    return leaves[0]


def _informative(cap: Captured, roles: dict, out: fx.Node) -> set[fx.Node]:
    """Nodes whose value is a feature of the output: reached through a layer with parameters, or - for an output
    without one after the grid (an embedding pooled from the last stage) - through an op that leaves the grid,
    unless the value is itself the output of a per-position projection that nothing learned follows (the logits
    map of a segmentation model or of VOLO's token-labelling head: a class score per position, not a feature)."""
    up = ancestors([out])

    def reads_params(u: fx.Node) -> bool:
        return any(a.name in cap.tensors and a.op == "placeholder" for a in u.all_input_nodes)

    learned: set[fx.Node] = set()
    leaves: set[fx.Node] = set()
    for n in reversed(list(cap.graph.nodes)):
        if n not in up or n.op != "call_function":
            continue
        users = [u for u in n.users if u in up]
        if any(u in learned or reads_params(u) for u in users):
            learned.add(n)
        if any(u in leaves or not _on_grid(u, roles) for u in users):
            leaves.add(n)
    projection = {n for n in leaves - learned if _projects(n, cap)}
    return learned | (leaves - projection)


def _projects(n: fx.Node, cap: Captured) -> bool:
    """Whether ``n`` is a linear map of features by the model's weights (linear, conv, a matmul with a weight)."""
    name = getattr(n.target, "__name__", "").split(".")[0]
    return name in ("linear", "conv2d", "convolution", "conv1d", "addmm", "matmul", "mm", "bmm", "einsum") and any(
        a.name in cap.tensors and a.op == "placeholder" for a in n.all_input_nodes)


def _on_grid(n: fx.Node, roles: dict) -> bool:
    """Whether ``n``'s value has an axis of more than one grid position."""
    r, val = roles.get(n), n.meta.get("val")
    return isinstance(val, Tensor) and isinstance(r, list) and any(
        isinstance(role, tuple) and role[0] in ("h", "w", "t") and not (isinstance(size, int) and size == 1)
        for role, size in zip(r, val.shape))


def _attends(cap: Captured, key: str) -> bool:
    """Whether a module call mixes tokens by attention (scaled dot-product attention or a softmax)."""
    return any(n.op == "call_function" and _in_scope(n, key)
               and getattr(n.target, "__name__", "").split(".")[0] in ("scaled_dot_product_attention", "softmax",
                                                                        "_softmax")
               for n in cap.graph.nodes)


def default_cut(cap: Captured, pr: Probe) -> fx.Node:
    """The default cut node (see the module docstring), or ValueError when the graph has none."""
    order = {n: i for i, n in enumerate(cap.graph.nodes)}
    ok = [n for n in pr.reaching if n in pr.learned]
    # a 1x1 grid (a pooled vector kept 4-D, VGG's 7x7 "fully connected" conv) is no map, where larger ones exist
    ok = [n for n in ok if pr.layouts[n].grid[0] * pr.layouts[n].grid[1] > 1] or ok
    if not ok:
        raise ValueError("no value inside the model is both on the input's grid and reached by the gradient of its "
                         "output at grid positions (pass layer='NAME' to cut after a submodule)")
    last = max(ok, key=order.__getitem__)
    for key, _, _ in reversed(scopes(last)):  # innermost first
        if any(o in pr.reaching for o in module_outputs(cap, key)):
            continue
        if _attends(cap, key):
            # an attention after which no grid position reaches the output (CLS-pooled or class attention):
            # the feature is its input, before the last token mixing
            ins = [n for n in module_inputs(cap, key) if n in pr.reaching]
            if ins:
                return max(ins, key=order.__getitem__)
        break
    cut = _through_layout_ops(last, pr)
    lost = _untracked_after(cap, pr, cut)
    if lost is not None:
        raise ValueError(
            f"after {name_of(cap, cut)!r} the model rearranges its positions in a way funcam cannot follow "
            f"({lost.name}, shape {tuple(lost.meta['val'].shape)}), so the last spatial feature is not known and "
            f"{name_of(cap, cut)!r} may be far from it; pass layer= to choose the cut")
    return cut


def _gridded(roles: Any) -> bool:
    return isinstance(roles, list) and any(isinstance(r, tuple) and r[0] in ("h", "w", "t") for r in roles)


def _untracked_after(cap: Captured, pr: Probe, cut: fx.Node) -> fx.Node | None:
    """A value after ``cut`` whose positions were lost (an unknown axis role) and from which the output is reached
    without passing through a value on the grid again: the model's later spatial structure is unknown."""
    main = _first_output_node(cap)
    up = ancestors([main])
    free = {main}
    for n in reversed(list(cap.graph.nodes)):
        if n in up and n not in free and any(u in free and not _gridded(pr.roles.get(u)) for u in n.users):
            free.add(n)
    after, stack = set(), [cut]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in after:
                after.add(u)
                stack.append(u)
    for n in cap.graph.nodes:
        r, val = pr.roles.get(n), n.meta.get("val")
        if n in after and n in free and isinstance(val, Tensor) and isinstance(r, list) and any(
                role == ("?",) and not (isinstance(size, int) and size == 1) for role, size in zip(r, val.shape)):
            return n
    return None


_LAYOUT_OPS = ("permute", "transpose", "view", "reshape", "_unsafe_view", "contiguous", "clone", "alias", "slice",
               "flatten", "unflatten", "swapaxes", "dropout")


def _through_layout_ops(node: fx.Node, pr: Probe) -> fx.Node:
    """Back from a value that only rearranges another grid value (a transpose, dropping the prefix tokens) to that
    value: the same map, and it is usually a module's output with a name."""
    while node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _LAYOUT_OPS:
        src = node.args[0]
        if "dropout" in node.target.__name__ and not (len(node.args) > 2 and node.args[2] is False):
            break  # a dropout that is active in training mode changes the values
        if not (isinstance(src, fx.Node) and src in pr.reaching and pr.layouts[src].grid == pr.layouts[node].grid):
            break
        node = src
    return node


def silent_modules(cap: Captured, names: Sequence[str], module_names: Sequence[str]) -> list[str]:
    """The submodule paths among ``names`` that no node of the capture runs inside: modules the capture folded away
    (``nn.Identity``) or that do not run; a capture preserving their call signatures tells which is which."""
    seen = {path for n in cap.graph.nodes for _, path, _ in scopes(n)}
    return [n for n in names if n in module_names and n not in seen]
