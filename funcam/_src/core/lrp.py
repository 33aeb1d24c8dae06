"""Layer-wise relevance propagation for every model the graph route captures: B images x K classes in one call.

LRP as a modified backward pass (Bach et al. 2015; the Gradient x Input formulation of Achtibat et al. 2024): the
model's captured ATen graph is rewritten op by op with a rule set (``funcam._src.cuts.lrp_ops.RULES``), the
rewritten forward is an ordinary function, and the relevance of class k at the input is ``x * g_k`` with
``g_k`` its vjp at the one-hot cotangent of class k, vmapped over the K classes (``engine.class_vjp``).

Rule sets: ``funcam.cam(model, x, classes, method=...)`` with ``"attnlrp"``, ``"cplrp"``, or ``"lrp"`` and its
``composite=`` option (``lrp_budget`` takes any of them as ``rule=``):

* ``"attnlrp"``: AttnLRP (Achtibat et al., ICML 2024) as lxt 2.1 computes it in its efficient mode: the identity
  rule at element-wise activations, LayerNorm / RMSNorm / GroupNorm with the standard deviation held constant, the
  gradient through linear and conv layers (no gamma), the uniform rule at products of two input-dependent values
  (attention's query and key gradients / 4, value / 2), the softmax by its gradient; the explained score's value is
  its relevance (a one-hot cotangent).
* ``"cplrp"``: CP-LRP (Ali et al., ICML 2022), as lxt 2.1: AttnLRP with the attention probabilities held constant.
* ``composite=`` ``"epsilon_plus"`` (default), ``"epsilon_plus_flat"``, ``"epsilon_alpha2_beta1"``,
  ``"epsilon_gamma_box"``: zennit 0.5's composites of those names, with its canonizers (each eval-mode batch norm
  merged into the conv / linear layer before it, leaving the factor 1 / sqrt(1 + eps) zennit's merge leaves; residual
  sums by its ``Norm`` rule); the explained score's relevance is 1 (zennit's one-hot output relevance). Ops a
  composite has no rule for (LayerNorm, attention, GELU, ...) take AttnLRP's.

Maps are ``(B, K, H, W)``: the input relevance summed over colour channels, signed (draw them with a diverging
colour map, ``cmap="bwr"``); ``per_channel=True`` keeps ``(B, K, C, H, W)``. Their sum over pixels is the explained
relevance less what bias terms absorb and what non-conservative rules (the softmax, the epsilon stabiliser) lose:
``lrp_budget`` reports the three.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core.engine import class_vjp, logits_of, resolve_classes
from funcam._src.core.request import Option, Request, flag, one_of
from funcam._src.cuts import lrp_rules
from funcam._src.cuts.auto import signature
from funcam._src.cuts.capture import capture
from funcam._src.cuts.lrp_graph import LrpGraph, lrp_graph
from funcam._src.cuts.lrp_ops import RULES, RuleSet

LRP_RULES = tuple(RULES)

# Bytes one vmapped class of ``lrp`` holds, per byte of the model's widest input-dependent activation (per image):
# that activation's gradient and the few of the layer being differentiated (its input's, the rule's temporaries).
# With 4 input sizes on top, measured as the resident memory per extra class in one unchunked vmap at 112 px, B = 2
# (attnlrp / epsilon_plus): resnet18 9.2 / 8.0 MiB, estimate 10.3; vit_small 4.5 / 3.5 MiB, estimate 4.7.
LRP_BYTES_PER_WIDEST = 6

# id(model) -> {(signature, rule name, budget): LrpGraph, (signature, None): its capture, shared by the rule sets},
# dropped when the model dies. Keyed by id, not a WeakKeyDictionary: torch.compile guards a weak dictionary's keys by
# their position, which other models dying between tracing and guarding shifts.
_GRAPHS: dict[int, dict] = {}
_LOCK = threading.Lock()


def rule_set(rule: Any) -> RuleSet:
    """The rule set named ``rule``, or ValueError naming the valid ones."""
    if not isinstance(rule, str) or rule.replace("-", "_") not in RULES:
        raise ValueError(f"rule must be one of {', '.join(LRP_RULES)}; got {rule!r}")
    return RULES[rule.replace("-", "_")]


def graph_for(model: nn.Module, x: Tensor, rules: RuleSet, budget: bool = False) -> LrpGraph:
    """The model's rewritten graph for ``x``'s signature (input size, dtype, device, training flags) and ``rules``
    (``budget``: with its additive constants scaled, for ``lrp_budget``), made on first use from the signature's one
    capture, and kept while the model lives (the graph reads the model's tensors at every call)."""
    sig = signature(model, x)
    key = (sig, rules.name, budget)
    graphs = _GRAPHS.get(id(model))
    lg = None if graphs is None else graphs.get(key)
    if lg is None:
        if torch.compiler.is_compiling():
            raise RuntimeError("funcam.lrp captures the model's graph on first use for each input size and rule, "
                               "which cannot happen inside torch.compile; call it once eagerly first")
        with _LOCK:
            graphs = _GRAPHS.get(id(model))
            if graphs is None:
                graphs = _GRAPHS[id(model)] = {}
                weakref.finalize(model, _GRAPHS.pop, id(model), None)
            lg = graphs.get(key)
            if lg is None:
                cap = graphs.get((sig, None))
                if cap is None:
                    cap = graphs[(sig, None)] = capture(model, x)
                lg = graphs[key] = lrp_graph(model, x, rules, cap, budget)
    return lg


def module_of(model_or_split: Any) -> nn.Module:
    model = model_or_split.module if isinstance(model_or_split, Split) else model_or_split
    model = _guard.unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a funcam.Split of one (with its module), got "
                        f"{type(model_or_split).__name__}")
    return model


def box(x: Tensor, low: Any, high: Any, rules: RuleSet) -> tuple[Tensor, Tensor]:
    """z^B's input bounds ``(low, high)``, each broadcastable to ``x (B, C, H, W)``: given (numbers or tensors), or
    each image's per-channel minimum and maximum; x itself for the rule sets without z^B (unread)."""
    if rules.first is not lrp_rules.zbox:
        if low is not None or high is not None:
            raise ValueError(f"low and high are the input bounds of composite='epsilon_gamma_box' (z^B at the "
                             f"first layer); {rules.name!r} does not read them")
        return x, x
    lo = x.amin(dim=(2, 3), keepdim=True) if low is None else torch.as_tensor(low, dtype=x.dtype, device=x.device)
    hi = x.amax(dim=(2, 3), keepdim=True) if high is None else torch.as_tensor(high, dtype=x.dtype, device=x.device)
    for name, v in (("low", lo), ("high", hi)):
        try:
            torch.broadcast_shapes(v.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"{name} must broadcast to x's shape {tuple(x.shape)}, got shape "
                             f"{tuple(v.shape)}") from None
    if not torch.compiler.is_compiling() and bool(((x < lo) | (x > hi)).any()):
        raise ValueError("x lies outside [low, high] somewhere: z^B's bounds must contain every input value (the "
                         "range of the model's normalised input, e.g. (0 - mean) / std to (1 - mean) / std)")
    return lo, hi


def _bound(name: str) -> Any:
    def check(v: Any) -> Any:
        if v is None or (isinstance(v, Tensor) and v.is_floating_point()):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
        raise TypeError(f"{name} must be None, a finite number or a floating-point tensor broadcastable to x, "
                        f"got {v!r}")
    return check


PER_CHANNEL = Option("per_channel", False, flag("per_channel"),
                     "keep the colour channels: maps (B, K, C, H, W) instead of their sum (B, K, H, W)")
COMPOSITES = tuple(n for n in LRP_RULES if RULES[n].one)  # zennit's composites: relevance 1 at the score
ATTN_OPTIONS = (PER_CHANNEL,)
LRP_OPTIONS = (
    Option("composite", "epsilon_plus", one_of("composite", COMPOSITES),
           "zennit's composite (batch norm merged into the layer before it): " + ", ".join(COMPOSITES), str),
    PER_CHANNEL,
    Option("low", None, _bound("low"), "z^B's lower input bound for composite='epsilon_gamma_box' (default: each "
           "image's per-channel minimum)", float),
    Option("high", None, _bound("high"), "z^B's upper input bound for composite='epsilon_gamma_box' (default: each "
           "image's per-channel maximum)", float),
)


def as_method(rule: str) -> tuple[str, dict]:
    """``(method, options)`` for ``funcam.cam`` that compute the rule set named ``rule`` (``LRP_RULES``): its own
    method for ``"attnlrp"`` / ``"cplrp"``, else ``"lrp"`` with ``composite=rule``."""
    name = rule_set(rule).name
    return (name, {}) if name in ATTN_METHODS else ("lrp", {"composite": name})


ATTN_METHODS = ("attnlrp", "cplrp")


class LRP(NamedTuple):
    """The table's compute for an LRP rule set: ``rule`` names it (``"attnlrp"``, ``"cplrp"``), or None to read
    it from the request's ``composite`` option (``method="lrp"``).

    ``(model or Split, x (B, C, H, W), req) -> CAM(maps (B, K, H, W), or (B, K, C, H, W) with per_channel,
    classes (B, K) or None, logits)``: the relevance ``x * g_k`` of every requested class in one vjp of the
    rewritten graph, vmapped over the K one-hot cotangents in chunks bounded by ``req.max_memory``
    (``LRP_BYTES_PER_WIDEST`` per byte of the model's widest input-dependent activation, per class). With a score
    callable for classes, the relevance at the model's output is the score's gradient there (times the output under
    AttnLRP / CP-LRP). The logits come from the rewritten forward (under a composite, of the batch-norm-merged model,
    within about ``n * eps / 2`` of the model's for n merged norms)."""

    rule: str | None = None

    def __call__(self, target: nn.Module | Split, x: Tensor, req: Request) -> CAM:
        o = req.options
        rules = RULES[self.rule or o["composite"]]
        per_channel = o["per_channel"]
        lo, hi = box(x, o.get("low"), o.get("high"), rules)
        model = module_of(target)
        lg = graph_for(model, x, rules)
        t = torch.zeros_like(x)

        def forward(*p: Tensor) -> tuple[Any, tuple]:
            return lg.run(model, p[0], p[1] if lg.tap else t, lo, hi), ()

        def reduce(grads: tuple[Tensor, ...], _: Any) -> Tensor:
            rel = x * grads[0] + (grads[1] if lg.tap else 0)  # (B, C, H, W)
            return rel if per_channel else rel.sum(dim=1)

        shape = tuple(x.shape[1:]) if per_channel else tuple(x.shape[2:])
        per_class = LRP_BYTES_PER_WIDEST * lg.widest * x.shape[0] + 4 * x.numel() * x.element_size()
        return class_vjp(forward, (x, t) if lg.tap else (x,), req, reduce,
                         empty=lambda b: x.new_zeros((b, 0) + shape), per_class_bytes=per_class)


class Budget(NamedTuple):
    """Where the relevance of each image and class went, all ``(B, K)``: ``start``, put at the explained score (its
    value under AttnLRP / CP-LRP, 1 under a composite); ``input``, the input relevance's sum; ``bias``, what the
    constants that enter input-dependent values additively absorb (biases, batch-norm shifts, position embeddings,
    class tokens, attention biases): ``c * dR/dc`` summed. A conservative rule set has ``input + bias == start``."""

    start: Tensor
    input: Tensor
    bias: Tensor


def lrp_budget(model: nn.Module, x: Tensor, classes: Any, *, rule: str = "attnlrp", low: Any = None,
               high: Any = None) -> Budget:
    """``Budget`` of ``lrp(model, x, classes, rule=rule)``, one image and class at a time (an audit, not a fast path;
    the constants' relevance comes from a second rewrite of the graph that scales each of them by a tap).
    classes: ints, ``(K,)`` or ``(B, K)`` class indices."""
    model = module_of(model)
    rules = rule_set(rule)
    lo, hi = box(x, low, high, rules)
    lg = graph_for(model, x, rules, budget=True)
    ones = x.new_ones(lg.n_scales)
    with torch.no_grad():
        logits = logits_of(lg.run(model, x, torch.zeros_like(x), lo, hi, ones))
    idx = resolve_classes(classes, None, logits)
    start, inp, bias = (x.new_zeros(idx.shape) for _ in range(3))
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        lob, hib = (v[b:b + 1] if v.shape[0] > 1 else v for v in (lo, hi))

        def out(xx: Tensor, tt: Tensor, ss: Tensor, lob: Tensor = lob, hib: Tensor = hib) -> Tensor:
            return logits_of(lg.run(model, xx, tt, lob, hib, ss))

        y, vjp_fn = torch.func.vjp(out, xb, torch.zeros_like(xb), ones)
        for k, c in enumerate(idx[b].tolist()):
            ct = torch.zeros_like(y)
            ct[0, c] = 1
            gx, gt, gs = vjp_fn(ct)
            start[b, k] = 1.0 if rules.one else y[0, c].detach()
            inp[b, k] = (xb * gx + gt).sum().detach()
            bias[b, k] = gs.sum().detach()
    return Budget(start, inp, bias)
