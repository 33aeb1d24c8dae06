"""Self-attention recomputed explicitly from a timm ``Attention`` module's own parameters.

timm's fused path calls ``F.scaled_dot_product_attention``; the CPU kernel's backward has no ``vmap``
batching rule, so a vmapped vjp through it falls back to a slow per-class loop. The explicit softmax form
below computes the same function (Vaswani et al. 2017, eq. 1: softmax(q k^T / sqrt(d)) v) with plain ops
that vmap batches, and exposes the attention probabilities (for rollout).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from funcam._src.cuts.capture import build, copy_node, first_output, scopes, unflatten
from funcam._src.cuts.layout import B, C

_PARTS = ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "attn_drop", "num_heads", "scale")


def is_plain_attention(attn: nn.Module) -> bool:
    """True for timm's ``Attention`` (ViT/DeiT/registers), whose math ``attend`` reproduces."""
    return type(attn).__name__ == "Attention" and all(hasattr(attn, p) for p in _PARTS)


def attention_probs(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, N, C) -> (probs (B, heads, N, N), v (B, heads, N, d))."""
    qkv = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.attn_drop(probs), v


def attention_output(attn: nn.Module, x: Tensor, probs: Tensor, v: Tensor) -> Tensor:
    """The module's output (B, N, C) from its probabilities ``probs (B, heads, N, N)`` and values
    ``v (B, heads, N, d)``; ``x (B, N, C)`` is the module's input (read only by a gated attention)."""
    out = attn.norm(rearrange(probs @ v, "b h n d -> b n (h d)"))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attend(attn: nn.Module, x: Tensor) -> Tensor:
    """The attention module's forward, x (B, N, C) -> (B, N, C), without the fused kernel."""
    if not is_plain_attention(attn):
        return attn(x)
    probs, v = attention_probs(attn, x)
    return attention_output(attn, x, probs, v)


def explicit_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` as plain ops (Vaswani et al. 2017, eq. 1), which ``vmap`` batches.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev); the mask, causal flag, scale and grouped-query
    heads as in PyTorch's reference implementation.
    """
    return tapped_sdpa(q, k, v, None, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def unfuse_attention(graph: fx.Graph) -> fx.Graph:
    """Replace every fused ``aten.scaled_dot_product_attention`` node of a captured graph by ``explicit_sdpa``,
    in place: the fused CPU kernel's backward has no vmap rule (a per-class loop, and a warning)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.scaled_dot_product_attention.default:
            n.target = explicit_sdpa
    return graph


# --- attention found in a captured graph (any transformer) ---------------------------------------------------------

def masked_softmax(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """``F.scaled_dot_product_attention``'s probabilities from its scores ``(..., L, S)``: a causal mask and
    ``attn_mask`` (boolean: where attention may go; else added to the scores) applied, softmax over S."""
    if is_causal:
        keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1)


def tapped_sdpa(q: Tensor, k: Tensor, v: Tensor, delta: Tensor | None, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> tuple[Tensor, Tensor]:
    """``explicit_sdpa`` with a zero-valued tap ``delta`` (or None) added to its probabilities: returns
    ``(out, probs)``; the gradient w.r.t. ``delta`` is the gradient w.r.t. the attention probabilities
    (B, heads, L, S)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    probs = masked_softmax((q * s) @ k.transpose(-2, -1), attn_mask, is_causal)
    if delta is not None:
        probs = probs + delta
    out = (F.dropout(probs, dropout_p) if dropout_p > 0 else probs) @ v
    return out, probs


class Source(NamedTuple):
    """Where a model's attention probabilities come from, for one input size.

    run(x, deltas) -> (the model's output, [probs (B, heads, N, N) per attention layer]); deltas: zero taps shaped
    like the probabilities (``taps(x)``), or None. layers: how many. readout: (N,) weights of the rows the output
    reads. prefix, grid: the token axis (prefix tokens, then a gh x gw grid). module: the model (for the guard).
    """

    run: Callable[[Tensor, Any], tuple[Any, list[Tensor]]]
    taps: Callable[[Tensor], tuple[Tensor, ...]]
    layers: int
    readout: Tensor
    prefix: int
    grid: tuple[int, int]
    module: nn.Module


class GraphAttention(NamedTuple):
    """The global self-attentions of a captured graph, each with a tap on its probabilities.

    run(x, deltas) -> (the model's output, [probs (B, heads, N, N) per attention, in forward order]);
    deltas: zero tensors shaped like the probabilities (``taps(x)``), or None.
    prefix, grid: the token axis: ``prefix`` tokens, then a ``grid = (gh, gw)`` of patches, row-major.
    readout: (N,) weights of the token rows the output reads after the last attention (uniform over them: the
        CLS row of a CLS-pooled model, every patch row of an average-pooled one).
    names: where each attention is (module paths).
    """

    run: Callable[[Tensor, Any], tuple[Any, list[Tensor]]]
    taps: Callable[[Tensor], tuple[Tensor, ...]]
    prefix: int
    grid: tuple[int, int]
    readout: Tensor
    names: tuple[str, ...]


def _token_attention(node: fx.Node, roles: dict) -> tuple[str, Any] | None:
    """('sdpa' | 'softmax', token role) when ``node`` is an attention over one token sequence, else None."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        rq, rk = roles.get(node.args[0]), roles.get(node.args[1])
        if (isinstance(rq, list) and isinstance(rk, list) and len(rq) == len(rk) == 4 and rq[0] == B
                and rq[-2][0] == "t" and rq[-2] == rk[-2]):
            return "sdpa", rq[-2]
        return None
    name = getattr(node.target, "__name__", "").split(".")[0]
    if name in ("softmax", "_softmax"):
        r = roles.get(node.args[0])
        if isinstance(r, list) and len(r) == 4 and r[0] == B and r[1] == C and node.args[1] in (-1, 3) \
                and r[2][0] == "t" and r[2] == r[3]:
            return "softmax", r[3]
    return None


class _AttentionCalls(torch.overrides.TorchFunctionMode):
    """Counts the calls that can be attention: scaled dot-product attention, multi-head attention, softmax."""

    seen = 0
    _CALLS = (F.scaled_dot_product_attention, F.multi_head_attention_forward, F.softmax, torch.softmax,
              Tensor.softmax)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._CALLS:
            self.seen += 1
        return func(*args, **(kwargs or {}))


def calls_attention(model: nn.Module, x: Tensor) -> bool:
    """Whether the forward on one image of ``x`` calls anything attention can be made of: one plain forward,
    far cheaper than capturing the graph of a model (a CNN) that has none."""
    with torch.no_grad(), _AttentionCalls() as mode:
        model(x[:1] if x.shape[0] else x.new_zeros((1,) + tuple(x.shape[1:])))
    return mode.seen > 0


def no_attention_error(model: nn.Module) -> ValueError:
    return ValueError(f"{type(model).__name__} has no self-attention over its patch tokens that funcam can find "
                      f"(F.scaled_dot_product_attention, nn.MultiheadAttention or a softmax over tokens): "
                      f"attention rollout and relevance need one; use funcam.gradcam")


def _other_attention(node: fx.Node, roles: dict) -> bool:
    """An attention (sdpa, or a softmax over its last axis) whose keys are not channels and not a token sequence
    on the grid: window attention (Swin), attention over positions the layout analysis lost."""
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        keys = roles.get(node.args[1])
        axis = keys[-2] if isinstance(keys, list) and len(keys) >= 2 else ("?",)
    elif getattr(node.target, "__name__", "").split(".")[0] in ("softmax", "_softmax"):
        r = roles.get(node.args[0])
        val = node.args[0].meta.get("val")
        if not isinstance(r, list) or val is None or val.ndim < 3:
            return False
        axis = r[node.args[1] % len(r)]
    else:
        return False
    return axis[0] not in ("c", "t")


def graph_attention(cap: Any, roles: dict, model: nn.Module, ex: Tensor) -> GraphAttention:
    """``GraphAttention`` for a captured graph (``funcam._src.cuts.capture``) with its axis roles
    (``funcam._src.cuts.layout.propagate``), checked at the example input ``ex``: every
    ``F.scaled_dot_product_attention`` (timm's fused attention, ``nn.MultiheadAttention``, Hugging Face's sdpa
    attention) and every explicit softmax over a token axis."""
    found = [(n,) + kind for n in cap.graph.nodes if (kind := _token_attention(n, roles)) is not None]
    windowed = [n for n in cap.graph.nodes if _other_attention(n, roles) and n not in {f[0] for f in found}]
    if not found and not windowed:
        raise no_attention_error(model)
    if windowed:
        raise ValueError(f"{type(model).__name__} also attends within windows or over sequences funcam cannot place "
                         f"on the patch grid ({windowed[0].name}); rollout multiplies attention matrices over one "
                         f"sequence of tokens, so it does not apply: use funcam.gradcam")
    roles = {r for _, _, r in found}
    if len(roles) != 1:
        raise ValueError(f"the attentions of {type(model).__name__} run over {len(roles)} different token sequences "
                         f"(windows, pooling stages or several branches); rollout multiplies attention matrices "
                         f"over one sequence of tokens, so it does not apply: use funcam.gradcam")
    _, prefix, gh, gw = roles.pop()
    g = fx.Graph()
    env: dict = {}
    x = g.placeholder("x")
    deltas = [g.placeholder(f"delta_{i}") for i in range(len(found))]
    at = {n: i for i, (n, _, _) in enumerate(found)}
    probs = []
    for n in cap.graph.nodes:
        if n.op == "output" or (n.op == "placeholder" and n is not cap.x):
            continue
        if n is cap.x:
            env[n] = x
            continue
        if n in at and found[at[n]][1] == "sdpa":
            args = tuple(env[a] for a in n.args[:3]) + (deltas[at[n]],) + tuple(
                fx.map_arg(a, env.__getitem__) for a in n.args[3:])
            both = g.call_function(tapped_sdpa, args, fx.map_arg(dict(n.kwargs), env.__getitem__))
            env[n] = g.call_function(operator.getitem, (both, 0))
            probs.append(g.call_function(operator.getitem, (both, 1)))
            continue
        new = copy_node(g, n, env, cap)
        if new.target is torch.ops.aten.scaled_dot_product_attention.default:
            new.target = explicit_sdpa  # class attention and the like: untapped, but vmap needs it unfused
        if n in at:
            new = g.call_function(operator.add, (new, deltas[at[n]]))
            probs.append(new)
        env[n] = new
    g.output((tuple(env[o] if isinstance(o, fx.Node) else o for o in cap.outputs), tuple(probs)))
    gm = build(cap, g, "attention")
    # the probabilities' shapes (batch first) and dtypes: a model may compute its softmax in float32 whatever x's
    metas = [((n.meta["val"].shape[:-1] + (n.args[1].meta["val"].shape[-2],)) if kind == "sdpa"
              else n.meta["val"].shape, n.meta["val"].dtype) for n, kind, _ in found]

    def taps(inp: Tensor) -> tuple[Tensor, ...]:
        return tuple(inp.new_zeros((inp.shape[0],) + tuple(int(v) for v in shape[1:]),
                                   dtype=dtype if dtype.is_floating_point else inp.dtype)
                     for shape, dtype in metas)

    def run(inp: Tensor, ds: Any) -> tuple[Any, list[Tensor]]:
        outs, ps = gm.gm(*gm.fetch(model), inp, *(taps(inp) if ds is None else ds))
        return unflatten(cap, outs), list(ps)

    # the rows that reach the output after the last attention: the gradient at its probabilities is non-zero there
    ds = [d.requires_grad_(i == len(found) - 1) for i, d in enumerate(taps(ex))]
    with torch.enable_grad():
        out, _ = run(ex, ds)
        main = first_output(out)
        cot = torch.randn(main.shape, generator=torch.Generator().manual_seed(0), dtype=main.dtype).to(main.device)
        (gl,) = torch.autograd.grad(main, ds[-1], cot, allow_unused=True)
    rows = (gl.abs().sum(dim=(0, 1, 3)) > 0) if gl is not None else torch.zeros(ds[-1].shape[2], dtype=torch.bool)
    if not bool(rows.any()):
        raise ValueError(f"the output of {type(model).__name__} does not depend on its last attention (zero gradient "
                         f"at every token): untrained zero weights, or an attention funcam misread")
    readout = rows.to(ex.dtype) / rows.sum()
    return GraphAttention(run, taps, int(prefix), (int(gh), int(gw)), readout.detach(),
                          tuple((scopes(n)[-1][1] if scopes(n) else n.name) for n, _, _ in found))
