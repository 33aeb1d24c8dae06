"""Whether a graph or FX cut's head starts with global average pooling: the exact fast path for many classes.

A head ``f`` of one NCHW map that only averages it over positions first, ``f(A) = g(mean_hw A)``, equals ``f`` run on
the ``(B, C, 1, 1)`` map of that mean, so ``pre_logits(z) = f(z[:, :, None, None])`` is ``g`` with no knowledge of
the model's classes (``funcam.Pooled`` with ``classifier=None``). It is accepted only when both hold:

* structure: every use of the cut value in the graph is a global average over its grid axes
  (``adaptive_avg_pool2d`` to 1x1, or ``mean`` over exactly the row and column axes), possibly behind copies;
* numbers: on a random probe at the cut's real size, the head equals the head at the probe's 1x1 mean, and a
  second probe with the same spatial mean but other values at each position gives the same output. The second
  probe refuses what the first may let through by chance: a head that weights positions (flatten then Linear),
  max-pools, or attends over them does not give one output per spatial mean.

The graph route checks each capture (each input size) for itself, at capture time; see ``funcam._src.cuts.auto``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from funcam._src.base import Features, Pooled

# ops that hand the cut value on unchanged (a head's input copy, a layout no-op)
_PASS = ("clone", "contiguous", "alias", "detach", "_clone")


def _op(n: fx.Node) -> str:
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    return name.split(".")[0]


def _grid_average(n: fx.Node, grid: tuple[int, int], ndim: int, model: nn.Module | None) -> bool:
    """Whether ``n`` averages its first argument over exactly the axes ``grid`` (row, col)."""
    if n.op == "call_module" and model is not None:
        m = model.get_submodule(n.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1), [1, 1]) and grid == (2, 3)
    name = _op(n)
    args = list(n.args) + [n.kwargs.get(k) for k in ("output_size", "dim") if k in n.kwargs]
    if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
        return len(args) > 1 and args[1] in (1, (1, 1), [1, 1]) and grid == (2, 3)
    if name == "mean":
        dims = args[1] if len(args) > 1 else None
        dims = [dims] if isinstance(dims, int) else dims
        return isinstance(dims, (list, tuple)) and {d % ndim for d in dims} == set(grid)
    return False


def pools_first(cut: fx.Node, grid: tuple[int, int] = (2, 3), ndim: int = 4, model: nn.Module | None = None) -> bool:
    """Whether every use of ``cut`` (through copies) is a global average over the grid axes ``grid``.
    ``model``: the traced module, for an FX graph's ``call_module`` nodes."""
    stack, seen = [cut], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output":
                return False  # the cut value itself leaves the model: not only its mean matters
            if u in seen:
                continue
            seen.add(u)
            if _op(u) in _PASS and u.args and u.args[0] is n:
                stack.append(u)
            elif not _grid_average(u, grid, ndim, model):
                return False
    return bool(seen)


def averages_first(head: Callable[[Tensor], Any], like: Tensor) -> bool:
    """The numeric check (module docstring) of ``head: A (B, C, h, w) -> output`` on probes shaped like ``like``.

    float32 and float64 only: in half precision the tolerance that rounding needs would also let a weakly
    position-dependent head through.
    """
    if torch.compiler.is_compiling() or like.dtype not in (torch.float32, torch.float64) or like.ndim != 4:
        return False  # the check branches on values; a compiled caller keeps the general path
    b, c, h, w = like.shape
    g = torch.Generator().manual_seed(0)
    a1 = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    d = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    z = a1.mean(dim=(2, 3), keepdim=True)
    a2 = z + (d - d.mean(dim=(2, 3), keepdim=True))  # the same mean, other values at every position
    try:
        with torch.no_grad():
            outs = [head(t.to(device=like.device, dtype=like.dtype)) for t in (a1, a2, z)]
    except Exception:  # noqa: BLE001 - a head that cannot take a 1x1 map (fixed-size reshapes) keeps the general path
        return False
    if not all(isinstance(o, Tensor) and o.ndim == 2 and o.shape == outs[0].shape for o in outs):
        return False  # logits (B, N) only: the fast path reports its output as the logits
    return all(_close(o, outs[2], scale=outs[0]) for o in outs[:2])


def _close(got: Tensor, want: Tensor, scale: Tensor) -> bool:
    """Equal up to the rounding of an average over h*w positions and a few layers, relative to ``scale``'s size."""
    tol = 64 * torch.finfo(want.dtype).eps * max(1.0, float(scale.abs().max()))
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=0, atol=tol))


def cut_averages_first(extract: Callable[[Tensor], Features], head: Callable[[Features], Any], ex: Tensor) -> bool:
    """The numeric check for a cut's own ``extract`` / ``head`` at the probe input ``ex (2, C, H, W)``: one map, and
    no tensor in the context (a skip over the cut would be held constant; such heads keep the general path)."""
    if torch.compiler.is_compiling():
        return False
    with torch.no_grad():
        fs = extract(ex)
    if len(fs.maps) != 1 or any(isinstance(c, Tensor) for c in fs.context):
        return False
    return averages_first(lambda a: head(Features((a,), fs.context)), fs.maps[0])


def splits_at(head: Callable[[Features], Any], pre: Callable[[Features], Any], classifier: nn.Linear,
              extract: Callable[[Tensor], Features], ex: Tensor) -> bool:
    """Whether ``head == classifier(pre)`` on a random 1x1 map: ``pre`` (the head up to the final Linear's input)
    was cut from the same graph, this confirms the Linear read is the last thing the head does."""
    with torch.no_grad():
        fs = extract(ex)
        c = fs.maps[0].shape[1]
        z = torch.randn(2, c, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        f = Features((z.to(device=ex.device, dtype=fs.maps[0].dtype),), fs.context)
        want, got = head(f), classifier(pre(f))
    return _close(got, want, scale=want)


def bound(head: Callable[[Features], Any], context: tuple, classifier: nn.Linear | None = None) -> Pooled:
    """``Pooled`` for ``head`` fed ``context`` (shapes, an absent prefix; no tensors): the head on a 1x1 map.
    With ``classifier``, ``head`` stops at its input (``pre_logits``) and the engine uses its weight rows."""
    def pre_logits(z: Tensor) -> Tensor:
        """z (B, C) -> logits (B, N), or the classifier's input (B, D)."""
        return head(Features((z[:, :, None, None],), context))

    return Pooled(pre_logits, classifier)
