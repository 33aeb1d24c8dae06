"""LRP on a captured graph: every op of the model's ATen graph (``funcam.cuts.capture``) rewritten by its rule.

The rules (``lrp_rules``) act on ops, not on module classes, so they apply to any model ``torch.export`` captures:
a rule set (``lrp_ops.RULES``) says what each kind of op becomes. Which ops carry relevance is read from the graph:
an op gets a rule only where its value depends on the input through a gradient path; the model's parameters,
position tables and masks are copied as they are. The kinds:

* linear or piecewise linear ops (reshapes, slicing, concatenation, sums and means, padding, linear / conv layers
  under AttnLRP, ReLU, max pooling, ...): their gradient is already the rule (LRP-0 in the Gradient x Input
  formulation; winner-takes-all at max pooling), so they are copied;
* element-wise activations through the origin (GELU, SiLU, tanh, hardswish, ...): the identity rule; gates that
  are not (sigmoid, hardsigmoid, exp, softplus: squeeze-excitation, gated units) held constant, so that the product
  with the gated value gives that value all relevance ("signal-take-all", Arras et al. 2017), which for
  a hand-written ``x * sigmoid(x)`` equals SiLU's identity rule;
* normalisations (LayerNorm, RMSNorm, GroupNorm, batch norm on batch statistics) and the statistics a hand-written
  one computes (``var``, ``std``, ``rsqrt``, ``sqrt``, vector norms, an input-dependent divisor): the standard
  deviation held constant, the mean keeping its gradient;
* products of two input-dependent values (``mul``, ``matmul``, ``bmm``, ``einsum``): the uniform rule; the fused
  ``scaled_dot_product_attention`` written out with it; the softmax keeps its gradient (AttnLRP) or is held
  constant (CP-LRP);
* under a zennit composite: conv layers by the composite's rule (z+, alpha2-beta1, gamma, and flat or z^B at the
  first layer), linear layers by LRP-epsilon, each eval-mode batch norm that follows a conv / linear layer merged
  into it (zennit's canonizer; a linear layer's output may be flattened to rows first, LeViT's ``LinearNorm``), any
  other one passed (``Pass``), average pooling and the sum of two input-dependent
  values (a residual connection) by LRP-epsilon without weights (zennit's ``Norm`` and its ResNet canonizer's ``Sum``).

An op that depends on the input and is none of these raises ValueError naming it and its module: a wrong rule would
give a silently wrong map.
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import optimization_hint

from funcam._src.cuts import lrp_rules as R
from funcam._src.cuts.auto import probe_input
from funcam._src.cuts.capture import Bound, Captured, build, capture, copy_node, unflatten
from funcam._src.cuts.lrp_ops import (
    ACTIVATIONS,
    ADDITIVE_ANY,
    ADDITIVE_AT,
    CONSTANT,
    CONVS,
    GATES,
    KEEPS_SIGN,
    NONNEG,
    NORMS,
    PLAIN,
    POOLS,
    PRODUCTS,
    SOFTMAX,
    STATISTICS,
    SUMS,
    RuleSet,
    bind,
    floating,
    functional,
    op_name,
    where,
)


class LrpGraph(NamedTuple):
    """A model's forward with LRP rules, for one input signature.

    bound: the rewritten graph, ``bound.gm(*model_tensors, x, t, low, high[, scales])``; t: a zero tap shaped like x
    that receives the first layer's relevance under flat / z^B (``tap``); low, high: z^B's input bounds.
    scales: with ``budget``, each constant that enters an input-dependent value additively (``ADDITIVE_AT``: biases,
    batch-norm shifts, position embeddings, class tokens, attention biases) is multiplied by its entry of a vector
    ``scales`` of ``n_scales`` ones: ``dR/dscales`` is the relevance each absorbs.
    widest: bytes per image of the widest input-dependent value (for chunking classes).
    """

    bound: Bound
    cap: Captured
    tap: bool
    n_scales: int
    widest: int

    def run(self, model: nn.Module, x: Tensor, t: Tensor, low: Tensor, high: Tensor,
            scales: Tensor | None = None) -> Any:
        """The model's output (its own structure) from the rewritten forward."""
        extra = () if scales is None else (scales,)
        return unflatten(self.cap, self.bound.gm(*self.bound.fetch(model), x, t, low, high, *extra))


class _Rewrite:
    """One rewrite of a captured graph under a rule set: the new graph, each old node's value in it (``env``), the
    old nodes that carry a gradient from the input (``dep``) and those known to be >= 0 (``nonneg``)."""

    def __init__(self, cap: Captured, rules: RuleSet, budget: bool = False):
        self.cap, self.rules, self.g, self.env = cap, rules, fx.Graph(), {}
        # every model tensor a leading placeholder, in the capture's order (``build`` binds them by name)
        for p in cap.graph.nodes:
            if p.op == "placeholder" and p is not cap.x:
                self.env[p] = self.g.placeholder(p.name)
                self.env[p].meta = dict(p.meta, funcam_tensor=p.name)
        self.x, self.t, self.low, self.high = (self.g.placeholder(s) for s in ("x", "t", "low", "high"))
        self.scales = self.g.placeholder("scales") if budget else None
        self.n_scales = 0
        self.env[cap.x] = self.x
        self.dep, self.nonneg = {cap.x}, set()
        self.tap = False  # a first-layer rule sends relevance to t
        self.merged = merges(cap) if rules.canonize else {}

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        get = self.env.__getitem__
        return self.g.call_function(fn, fx.map_arg(args, get), fx.map_arg(kwargs, get))

    def new(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """A call whose arguments are already nodes of the new graph."""
        return self.g.call_function(fn, args, kwargs)

    def copy(self, n: fx.Node) -> fx.Node:
        new = copy_node(self.g, n, self.env, self.cap)
        new.target = functional(n)
        return new

    def constant(self, n: fx.Node) -> fx.Node:
        """``n`` computed from detached inputs: its value, held constant (no gradient, any number of outputs)."""
        env = dict(self.env)
        for a in n.all_input_nodes:
            if a in self.dep:
                env[a] = self.new(torch.ops.aten.detach.default, self.env[a])
        new = copy_node(self.g, n, env, self.cap)
        new.target = functional(n)
        return new

    def run(self) -> fx.Graph:
        for n in self.cap.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if op_name(n) in CONSTANT or not floating(n) or not any(a in self.dep for a in n.all_input_nodes):
                self.env[n] = copy_node(self.g, n, self.env, self.cap)  # constant w.r.t. the input
                continue
            saved = self.scale_constants(n)
            new, carries = self.rule(n)
            self.env.update(saved)
            self.env[n] = new
            mutated = functional(n) is not n.target and n.args and isinstance(n.args[0], fx.Node)
            if mutated:
                self.env[n.args[0]] = new  # an in-place op answered out of place: later readers see the new value
            if carries:
                self.dep.update((n, n.args[0]) if mutated else (n,))
            name = op_name(n).rstrip("_")
            ins = [a for a in n.all_input_nodes if floating(a)]
            if name in NONNEG or (name in KEEPS_SIGN and ins and all(a in self.nonneg for a in ins)):
                self.nonneg.add(n)
        outs = []
        for o in self.cap.outputs:
            v = self.env[o] if isinstance(o, fx.Node) else o
            outs.append(self.g.call_function(R.to_one, (v,)) if self.rules.one and o in self.dep else v)
        self.g.output(tuple(outs))
        return self.g

    def scale_constants(self, n: fx.Node) -> dict:
        """With ``scales``: the constants ``n`` adds to input-dependent values, each times its own scale while ``n``'s
        rule is emitted (the old values returned, to be put back)."""
        if self.scales is None:
            return {}
        name = op_name(n).rstrip("_")
        if name in ADDITIVE_ANY:
            args = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]
        else:
            args = [n.args[i] for i in ADDITIVE_AT.get(name, ()) if i < len(n.args)]
        if n in self.merged or n in self.merged.values():
            args = []  # the merged bias is scaled in ``layer``
        saved = {}
        for a in args:
            if isinstance(a, fx.Node) and a not in self.dep and a not in saved and floating(a):
                saved[a] = self.env[a]
                self.env[a] = self.scaled(self.env[a])
        return saved

    def scaled(self, v: fx.Node) -> fx.Node:
        s = self.new(operator.getitem, self.scales, self.n_scales)
        self.n_scales += 1
        return self.new(operator.mul, v, s)

    def rule(self, n: fx.Node) -> tuple[fx.Node, bool]:
        """(n's value in the new graph, whether it carries a gradient from the input)."""
        r, name = self.rules, op_name(n)
        base = name[:-1] if functional(n) is not n.target else name
        if base in CONVS or base == "linear":
            return self.layer(n, base), True
        if n in self.merged.values():
            # zennit's canonizer leaves the merged batch norm computing x / sqrt(1 + eps): kept, for equal maps
            return self.new(operator.mul, self.env[n.args[0]], (1 + bind(n)["eps"]) ** -0.5), True
        if base == "batch_norm":
            return self.batch_norm(n), True
        if base in NORMS:
            return self.call(getattr(R, base), *n.args, **n.kwargs), True
        if base in SOFTMAX:
            return (self.constant(n), False) if r.cp else (self.copy(n), True)
        if base == "scaled_dot_product_attention":
            a = bind(n)
            deps = tuple(a[k] in self.dep for k in ("query", "key", "value"))
            return self.call(R.sdpa, *(a[k] for k in ("query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                                                     "scale", "enable_gqa")), deps=deps, cp=r.cp), True
        if base in PRODUCTS:
            deps = [isinstance(a, fx.Node) and a in self.dep for a in pytree.tree_leaves(n.args)
                    if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), Tensor)]
            if base in ("baddbmm", "addmm", "addcmul"):
                deps[0] = False  # the added input is not a factor of the product
            if sum(deps) < 2:
                return self.copy(n), True
            return self.call(R.product, functional(n), tuple(deps), *n.args, **n.kwargs), True
        if base == "div" and len(n.args) > 1 and n.args[1] in self.dep:
            return self.call(R.divide, *n.args, **n.kwargs), n.args[0] in self.dep
        if base in ACTIVATIONS:
            ins = [a for a in n.all_input_nodes if a in self.dep]
            if len(ins) != 1:
                raise self.no_rule(n, "an element-wise op of several input-dependent values")
            return self.new(R.identity_rule, self.copy(n), self.env[ins[0]]), True
        if base in ("var_mean", "std_mean"):
            a = bind(n)
            return self.call(R.statistic_and_mean, functional(n), a["dim"], a["keepdim"], *n.args, **n.kwargs), True
        if base in STATISTICS or base in GATES:
            return self.constant(n), False
        if r.canonize and (base in POOLS or (base in SUMS and sum(a in self.dep for a in n.all_input_nodes) == 2)):
            return self.new(R.epsilon, self.copy(n)), True
        if base in PLAIN:
            return self.copy(n), True
        raise self.no_rule(n, "an op")

    def no_rule(self, n: fx.Node, what: str) -> ValueError:
        return ValueError(f"lrp: no LRP rule for {what} in the captured graph: {op_name(n)} ({where(n)}), whose value "
                          f"depends on the input; the rule sets cover linear and piecewise linear ops, element-wise "
                          f"activations, normalisations, products, softmax and attention (funcam/_src/cuts/lrp_ops.py)")

    def layer(self, n: fx.Node, base: str) -> fx.Node:
        """A conv or linear layer: merged with the batch norm after it (under a composite), then its rule."""
        r, a = self.rules, bind(n)
        names = [arg.name for arg in n.target._schema.arguments]
        x, w, b = (a[k] for k in names[:3])
        if w in self.dep or b in self.dep:
            raise self.no_rule(n, f"a {base} layer with input-dependent weights")
        rest = tuple(a[k] for k in names[3:])
        op = functional(n)
        if n in self.merged:
            bn = bind(self.merged[n])
            transposed = base.startswith("conv_transpose") or (base == "convolution" and a["transposed"])
            wb = self.call(R.merge_batch_norm, w, b, bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"],
                           bn["eps"], transposed)
            w, b = (self.g.call_function(operator.getitem, (wb, i)) for i in (0, 1))
            b = b if self.scales is None else self.scaled(b)
        else:
            w, b = self.env[w], None if b is None else self.env[b]
        if r.first is not None and not self.tap and base in r.first_ops:
            if x is not self.cap.x:
                raise ValueError(f"lrp: rule={r.name!r} applies its first-layer rule to the first {base} layer, which "
                                 f"must read the input itself; in this graph it reads {x.name} ({where(n)})")
            self.tap = True
            extra = (self.low, self.high) if r.first is R.zbox else ()
            return self.g.call_function(r.first, (op, rest, self.x, self.t, w, b) + extra)
        rest = fx.map_arg(rest, self.env.__getitem__)
        if base != "linear" and r.conv is not None:
            return self.g.call_function(r.conv, (op, rest, self.env[x], w, b), {"nonneg": x in self.nonneg})
        y = self.g.call_function(op, (self.env[x], w, b) + rest)
        return self.g.call_function(R.epsilon, (y,)) if base == "linear" and r.linear else y

    def batch_norm(self, n: fx.Node) -> fx.Node:
        """Batch norm not merged: on batch statistics (training mode) the standard deviation held constant; in eval
        mode an affine map, its gradient under AttnLRP, zennit's ``Pass`` under a composite."""
        a = bind(n)
        if a["training"] or a["running_mean"] is None:
            return self.call(R.batch_norm_batch_stats, a["input"], a["weight"], a["bias"], a["eps"])
        new = self.call(R.batch_norm_affine, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                        a["eps"])
        return self.new(R.identity_rule, new, self.env[a["input"]]) if self.rules.canonize else new


# reshapes between a linear layer and the BatchNorm1d after it (LeViT's ``LinearNorm``: ``bn(linear(x).flatten(0, 1))``)
FLATTENS = frozenset("view reshape _unsafe_view flatten".split())
SHAPE_OF = frozenset(("reshape_as", "view_as", "expand_as"))  # ops that read their second argument's shape only


def merges(cap: Captured) -> dict[fx.Node, fx.Node]:
    """conv / linear node -> the eval-mode batch norm that is its only reader (zennit's ``SequentialMergeBatchNorm``
    merges a batch norm into the layer right before it); grouped transposed convs are left unmerged. A linear layer's
    output may reach the norm through reshapes to ``(M, C)`` (each the only reader of the one before): a row-major
    reshape that keeps the last axis's size keeps each value's channel, so the norm acts on the layer's output
    channels, as the merge assumes (zennit's canonizer merges LeViT's ``LinearNorm`` so, by module order)."""
    out = {}
    for n in cap.graph.nodes:
        if n.op != "call_function" or op_name(n) != "batch_norm":
            continue
        a = bind(n)
        src = a["input"]
        if a["training"] or a["running_mean"] is None or not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        while op_name(src) in FLATTENS and isinstance(src.args[0], fx.Node) and sole_reader(src.args[0], src):
            src = src.args[0]
        base = op_name(src)
        if base == "linear" and channels_last(src, a["input"]):
            out[src] = n
        elif src is a["input"] and base in CONVS and not (base.startswith("conv_transpose")
                                                           and bind(src)["groups"] != 1):
            out[src] = n
    return out


def sole_reader(n: fx.Node, user: fx.Node) -> bool:
    """Whether ``user`` is the only node that reads ``n``'s values (others may read its shape: LeViT's
    ``bn(y.flatten(0, 1)).reshape_as(y)``)."""
    return all(u is user or (op_name(u) in SHAPE_OF and u.args[0] is not n) for u in n.users)


def channels_last(lin: fx.Node, bn_in: fx.Node) -> bool:
    """Whether the batch norm's input ``(M, C)`` holds the linear layer's output ``(..., C)`` channels in dim 1."""
    y, z = lin.meta.get("val"), bn_in.meta.get("val")
    return isinstance(y, Tensor) and isinstance(z, Tensor) and z.ndim == 2 and y.shape[-1] == z.shape[1]


def widest(cap: Captured, dep: set) -> int:
    """Bytes per image of the widest input-dependent value."""
    best = 0
    for n in dep:
        for t in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(t, Tensor):
                best = max(best, optimization_hint(t.numel()) * t.element_size())
    return best // max(1, cap.batch)


def lrp_graph(model: nn.Module, x: Tensor, rules: RuleSet, cap: Captured | None = None,
              budget: bool = False) -> LrpGraph:
    """``model``'s forward on inputs shaped like ``x (B, C, H, W)`` with ``rules``, checked at a probe input: its
    output equals ``model(x)`` (the rules change gradients only; merged batch norms round differently). cap: the
    model's capture for x's signature, to rewrite it once more (the rewrite leaves it as it is); None: captured now."""
    cap = capture(model, x) if cap is None else cap
    rw = _Rewrite(cap, rules, budget)
    graph = rw.run()
    lg = LrpGraph(build(cap, graph, f"lrp_{rules.name}"), cap, rw.tap, rw.n_scales, widest(cap, rw.dep))
    ex = probe_input(x)
    devices = [ex.device] if ex.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        want = [t for t in pytree.tree_leaves(model(ex)) if isinstance(t, Tensor)]
        torch.manual_seed(0)
        ones = ex.new_ones(lg.n_scales) if budget else None
        got = [t for t in pytree.tree_leaves(lg.run(model, ex, torch.zeros_like(ex), ex, ex, ones))
               if isinstance(t, Tensor)]
    # plus the merged batch norms' factors 1 / sqrt(1 + eps) (zennit's), each about eps / 2 off
    tol = max(1e-4, 16 * torch.finfo(ex.dtype).eps) + sum(bind(bn)["eps"] for bn in rw.merged.values())
    if len(want) != len(got) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol)
                                    for a, b in zip(want, got) if a.is_floating_point()):
        raise ValueError(f"lrp: the graph captured from {type(model).__name__} with rule={rules.name!r} does not "
                         f"reproduce model(x); the forward may depend on values or state that the capture fixed")
    return lg
