"""Self-attention recomputed explicitly from a timm ``Attention`` module's own parameters.

timm's fused path calls ``F.scaled_dot_product_attention``; the CPU kernel's backward has no ``vmap``
batching rule, so a vmapped vjp through it falls back to a slow per-class loop. The explicit softmax form
below computes the same function (Vaswani et al. 2017, eq. 1: softmax(q k^T / sqrt(d)) v) with plain ops
that vmap batches, and exposes the attention probabilities (for rollout).
"""
from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

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
