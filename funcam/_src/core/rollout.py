"""Attention rollout and class-specific attention relevance for any transformer, without hooks.

Where the attention probabilities come from:

* timm Vision Transformers with pre-norm blocks and plain softmax attention: every block's probabilities are
  recomputed from the block's own parameters (``funcam._src.cuts.attention.attention_probs``).
* any other model (timm's BEiT, EVA, DeiT3, CaiT's self-attention blocks, torchvision ``vit_b_16``, Hugging Face
  ViT / DeiT / Dinov2, ...): the model's graph is captured (``funcam._src.cuts``) and every attention over its patch
  tokens - ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, an explicit softmax - is computed
  explicitly with a zero-valued tap on its probabilities (``funcam._src.cuts.attention.graph_attention``).
  Pass ``funcam.split(model)`` instead of the model to reuse its captured graph across calls.

Order of the product. Block ``l`` mixes tokens as ``x_l = A_l x_{l-1}`` (rows of ``A_l`` are the queries), so
the tokens after the last block depend on the input tokens through ``R = A_L ... A_2 A_1``: the first block's
matrix is applied first (rightmost). The map is the readout row of ``R`` at the patch columns, computed as the row
vector ``e^T A_L`` then times ``A_{L-1}``, ..., ``A_1`` (vector-matrix products, O(L N^2) per image and class
instead of O(L N^3)); ``rollout_matrix`` returns the full ``R`` for checks.

Readout row: the tokens the output reads after the last attention - the CLS row for CLS-pooled ViTs, the mean of
the patch rows for average-pooled ones (timm ViTs: from ``global_pool``; DeiT-distilled: its CLS head; other
models: the rows whose gradient from the output is non-zero, uniformly weighted). Prefix tokens (CLS,
distillation, registers) are never map pixels.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from einops import rearrange
from einops import reduce as ereduce
from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.base import CAM, Split
from funcam._src.core.engine import class_indices, class_vjp, logits_or_output
from funcam._src.core.request import Option, Request
from funcam._src.cuts.attention import Source
from funcam._src.cuts.route import attention_source

HEAD_FUSIONS = ("mean", "max", "min")


def source(model_or_split: Any, x: Tensor) -> Source:
    """The attention ``Source`` of a model (or of ``funcam.split(model)``, reusing its captured graph) for ``x``: the
    route table's (``funcam._src.cuts.route.attention_source``)."""
    graph = getattr(model_or_split, "graph", None) if isinstance(model_or_split, Split) else None
    model = _guard.unwrap(model_or_split.module if isinstance(model_or_split, Split) else model_or_split)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a funcam.Split of one, got "
                        f"{type(model_or_split).__name__}")
    return attention_source(model, x, graph)


@_guard.entry()
def block_attentions(model: nn.Module | Split, x: Tensor) -> list[Tensor]:
    """Attention probabilities of every attention layer: x (B, 3, H, W) -> L tensors (B, heads, N, N),
    N = prefix + h*w (any transformer; see the module docstring)."""
    return source(model, x).run(x, None)[1]


def _to_grid(src: Source, cols: Tensor) -> Tensor:
    """Patch columns of token rows ``cols (..., N)`` -> ``(..., h, w)`` on the token grid (non-square too)."""
    gh, gw = src.grid
    return rearrange(cols[..., src.prefix:], "... (h w) -> ... h w", h=gh, w=gw)


def fuse_heads(probs: Tensor, head_fusion: str) -> Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads (vit-explain's head fusion)."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    return ereduce(probs, "b h n m -> b n m", head_fusion)


def discard_lowest(a: Tensor, discard_ratio: float) -> Tensor:
    """Zero the ``int(N*N*discard_ratio)`` smallest entries of each image's ``a (B, N, N)``, except CLS->CLS
    (Abnar & Zuidema 2020 as implemented in jacobgil/vit-explain, per image instead of image 0 only)."""
    b, n, _ = a.shape
    k = int(n * n * discard_ratio)
    if k == 0:
        return a
    flat = a.reshape(b, n * n)
    # topk of the smaller side: fewer entries to sort at large discard ratios (ties, as in vit-explain, broken
    # arbitrarily)
    if 2 * k <= n * n:
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(k, dim=-1, largest=False).indices, True)
    else:
        drop = torch.ones_like(flat, dtype=torch.bool).scatter(1, flat.topk(n * n - k, dim=-1).indices, False)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(b, n, n)


def mix_identity(a: Tensor) -> Tensor:
    """Residual mixing ``(A + I) / 2`` then rows normalised to sum 1 (Abnar & Zuidema 2020, sec. 3): (B, N, N)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    m = (a + eye) / 2
    return m / m.sum(dim=-1, keepdim=True)


def _check_rollout_args(head_fusion: str, discard_ratio: float, start_block: int, layers: int) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")
    n = layers
    if isinstance(start_block, bool) or not isinstance(start_block, int) or not 0 <= start_block < n:
        raise ValueError(f"start_block must be an int in [0, {n}) (the model has {n} blocks), got {start_block!r}")


def _mixed(model: Any, x: Tensor, head_fusion: str, discard_ratio: float,
           start_block: int) -> tuple[list[Tensor], Any, Source]:
    """(the mixed attention matrices of blocks start_block.., the model's output, the source) from one forward."""
    _check_rollout_args(head_fusion, discard_ratio, 0, 1)
    src = source(model, x)
    _check_rollout_args(head_fusion, discard_ratio, start_block, src.layers)
    out, probs = src.run(x, None)
    # non-finite probabilities need no check of their own (12 of them cost 13 % of a vit_small rollout): a NaN
    # survives every product and normalisation below into the maps, which the entry's output check refuses
    mats = [mix_identity(discard_lowest(fuse_heads(p.to(x.dtype), head_fusion), discard_ratio))
            for p in probs[start_block:]]
    return mats, out, src


@_guard.entry()
def rollout_matrix(model: nn.Module | Split, x: Tensor, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   start_block: int = 0) -> Tensor:
    """The rolled-out matrix ``R = A_L ... A_s`` (B, N, N), rows summing to 1 (arguments as ``attention_rollout``)."""
    mats, _, _ = _mixed(model, x, head_fusion, discard_ratio, start_block)
    r = mats[0]
    for m in mats[1:]:
        r = m @ r  # later blocks on the left: R_l = A_l R_{l-1}
    return r


@_guard.entry()
def attention_rollout(model: nn.Module | Split, x: Tensor, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_block: int = 0) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): x (B, 3, H, W) -> maps (B, 1, h, w) on the token grid.

    model: a transformer (see the module docstring) or ``funcam.split(model)`` to reuse its captured graph.
    head_fusion: "mean" | "max" | "min" over heads. discard_ratio in [0, 1): per image, that fraction of the
    fused matrix's entries (the smallest) is zeroed, CLS->CLS kept. start_block: the first block rolled out.
    Class-agnostic: one map per image, as the one "class" of the ``(B, K, h, w)`` maps contract
    (``funcam.cam(..., method="rollout")`` repeats it for K classes). Raw values (the readout row of ``R``, patch
    columns; not normalised). Differentiable when grad mode is on; ``torch.no_grad()`` skips the autograd graph.
    """
    return _rollout(model, x, head_fusion, discard_ratio, start_block)[0].unsqueeze(1)


def _rollout(model: Any, x: Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
             start_block: int = 0) -> tuple[Tensor, Any]:
    """``(rollout maps (B, h, w), logits (B, N))`` from one forward (a model whose output is not logits reports
    its output as it is)."""
    mats, out, src = _mixed(model, x, head_fusion, discard_ratio, start_block)
    row = src.readout.to(mats[0].dtype).expand(x.shape[0], 1, -1)  # (B, 1, N)
    for m in reversed(mats):
        row = row @ m  # e^T A_L, then (e^T A_L) A_{L-1}, ...: the same product as R, from the left
    return _to_grid(src, row[:, 0]), logits_or_output(out)


def rollout_cam(model: Any, x: Tensor, req: Request) -> CAM:
    """``funcam.cam(..., method="rollout")``: the class-agnostic map repeated for the K requested classes (or the K
    columns of a score callable), with the logits of the same forward."""
    o = req.options
    m, logits = _rollout(model, x, o["head_fusion"], o["discard_ratio"], o["start_block"])
    idx, picked = class_indices(req.score_fn(logits) if req.score_fn else logits, logits, req, x.shape[0])
    return CAM(m.unsqueeze(1).expand(-1, idx.shape[1], -1, -1), picked, logits)


def _check_discard(v: Any) -> float:
    _check_rollout_args("mean", v, 0, 1)
    return v


def _check_start(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"start_block must be an int >= 0 (and below the model's number of blocks), got {v!r}")
    return v


def _check_fusion(v: Any) -> str:
    _check_rollout_args(v, 0.0, 0, 1)
    return v


# attention rollout's options (``attention_rollout``'s keywords), for ``funcam.cam(..., method="rollout")``
ROLLOUT_OPTIONS = (
    Option("head_fusion", "mean", _check_fusion, "how heads are fused: mean, max or min", str),
    Option("discard_ratio", 0.0, _check_discard, "fraction in [0, 1) of each fused matrix's smallest entries zeroed",
           float),
    Option("start_block", 0, _check_start, "the first block rolled out", int),
)

Step = Callable[[Tensor, Tensor, Tensor], Tensor]


class Relevance(NamedTuple):
    """Class-specific attention relevance with one layer's ``step(row, d score_k / dA_l, A_l) -> row``, as a method's
    computation (``funcam.cam`` with ``method="grad_rollout"`` or ``"chefer"``)."""

    step: Step

    def __call__(self, model: Any, x: Tensor, req: Request) -> CAM:
        return relevance(model, x, req, self.step)


def relevance(model: Any, x: Tensor, req: Request, step: Step) -> CAM:
    """Class-specific attention relevance: per attention layer, from the last to the first,
    ``row <- step(row, d score_k / dA_l, A_l)`` on the readout row; the maps are its patch columns on the token
    grid, ``(B, K, h, w)``. One forward, one vjp at zero-valued taps on the probabilities, vmapped over the K
    one-hot cotangents, in chunks of classes bounded by ``max_memory`` (``relevance_bytes_per_class``) unless
    ``chunk_size`` is given."""
    src = source(model, x)
    b = x.shape[0]
    gh, gw = src.grid
    deltas = src.taps(x)

    def reduce(grads: tuple[Tensor, ...], probs: list[Tensor]) -> Tensor:
        row = src.readout.expand(b, 1, -1)  # (B, 1, N)
        for g, a in zip(reversed(grads), reversed(probs)):
            # blocks from the last to the first: row^T M_L ... M_1 (in x's dtype: a model may keep its softmax
            # in float32)
            row = step(row, g.to(row.dtype), a.to(row.dtype))
        return _to_grid(src, row[:, 0])

    return class_vjp(lambda *d: src.run(x, d), deltas, req, reduce, empty=lambda bb: x.new_zeros(bb, 0, gh, gw),
                     per_class_bytes=relevance_bytes_per_class(deltas, x, token_width(src.module)))


def relevance_bytes_per_class(taps: tuple[Tensor, ...], x: Tensor, width: int) -> int:
    """What one vmapped class of ``relevance`` holds at its peak, in bytes (conservative).

    taps: the L zero taps (B, heads, N, N); x: the input, for its dtype; width: the widest per-token activation
    (``token_width``). Counted: the class's gradient at every tap, all L kept until the readout row is folded,
    and as much again (the softmax backward's gradient at each block's probabilities, and the rule's products);
    four more (B, heads, N, N) of the block in flight; eight (B, N, width) token activation gradients (the
    residual stream's and the MLP's). Calibrated on vit_small at 224 and 112 pixels, 6 and 12 blocks (resident
    memory per extra class in one unchunked vmap at B = 2: 28, 48 and 7.6 MiB; this gives 47, 68 and 7.9 MiB).
    """
    b, n = x.shape[0], taps[0].shape[-1]
    grads = sum(t.numel() * t.element_size() for t in taps)
    block = max(t.numel() * t.element_size() for t in taps)
    return 2 * grads + 4 * block + 8 * b * n * width * x.element_size()


def token_width(model: nn.Module) -> int:
    """The widest per-token activation of a transformer, taken as its widest ``nn.Linear`` (in or out features):
    the MLP's hidden layer in ViTs (a classifier wider than that only makes the estimate more conservative).
    Without any Linear, the largest dimension of any weight (conservative again)."""
    linear = [max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    return max(linear) if linear else max((max(p.shape) for p in model.parameters() if p.ndim >= 2), default=1)


def grad_rollout_step(row: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """Gradient-weighted rollout, one layer (jacobgil/vit-explain, each block's gradient paired with its own
    attention): Abar = (mean over heads of g * A)^+, then (Abar + I) / 2 with rows normalised; row (B, 1, N)."""
    fused = (g * a).mean(dim=1).clamp(min=0)
    return row @ mix_identity(fused)


def chefer_step(row: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """Chefer, Gur & Wolf 2021 ("Generic attention-model explainability", eq. 5-6 for self-attention), one layer:
    Abar = E_h[(g * A)^+], R <- R + Abar R; for the readout row: row (I + Abar)."""
    fused = (g * a).clamp(min=0).mean(dim=1)
    return row + row @ fused
