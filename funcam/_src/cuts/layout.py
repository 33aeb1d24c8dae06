"""Axis roles of every value in a captured ATen graph: which axis is the batch, which follow the input's height
and width, which hold the tokens of a (prefix + h*w) grid. Found by propagating roles from the input ``x`` through
each op, so a channels-last feature, a token sequence with CLS / distillation / register tokens or a non-square
grid is read from the graph, not guessed from a shape.

Roles (one per axis of a tensor):

* ``B``: the batch (also recognised from the batch size symbol of a dynamic-batch capture).
* ``C``: does not follow the input grid: channels, heads, parameters' axes, a pooled 1x1, size-1 axes.
* ``("h", shift)`` / ``("w", shift)``: rows / columns of the input grid, in order; ``shift`` is a cyclic shift
  from ``roll`` (Swin's shifted windows), so only ``shift == 0`` is aligned with the image.
* ``("t", p, gh, gw)``: a token axis of ``p`` leading tokens that are not positions (CLS, distillation,
  registers) followed by a ``gh x gw`` grid in row-major order.
* ``S``: the position inside a cell after a row or column was split (space-to-depth, window partition); it
  becomes a channel when merged with channels and the row again when merged back with its row.
* ``U``: unknown (the batch mixed with positions, as in window partitions; im2col; an op without a rule). A
  value with an unknown axis is never a cut.

Elementwise ops merge their operands' roles axis by axis: a grid role wins over ``C`` (a position embedding
added to tokens is aligned with them) and over ``U`` (the residual stream of a windowed block is aligned even
though the window branch's roles were lost); two different grid roles give ``U``.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx

B, C, S, U = ("b",), ("c",), ("s",), ("?",)
H0, W0 = ("h", 0), ("w", 0)
Role = tuple
Roles = list  # one Role per axis; a list of Roles per element for ops that return a tuple

_GRID = ("b", "h", "w", "t", "m")
_BIG = 1_000_003  # stands for the symbolic batch size in size arithmetic (a prime: no accidental factoring)


class Layout(NamedTuple):
    """Where a feature's axes are: ``batch``, ``channel`` and either ``(row, col)`` axes or one ``token`` axis.

    For tokens, ``prefix`` tokens come first and ``grid = (gh, gw)`` positions follow, row-major.
    """

    ndim: int
    batch: int
    channel: int
    row: int | None = None
    col: int | None = None
    token: int | None = None
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        """'NCHW', 'NHWC' (and other row/col orders) or 'tokens'."""
        if self.token is not None:
            return "tokens"
        order = sorted([(self.batch, "N"), (self.channel, "C"), (self.row, "H"), (self.col, "W")])
        return "".join(c for _, c in order)


def layout_of(roles: Sequence[Role], shape: Sequence[int]) -> Layout | None:
    """The ``Layout`` of a value with these roles, or None when it is not a (batch, channel, grid) feature."""
    if any(r == U for r in roles) or roles.count(B) != 1:
        return None
    batch = roles.index(B)
    rows = [i for i, r in enumerate(roles) if r == H0]
    cols = [i for i, r in enumerate(roles) if r == W0]
    toks = [i for i, r in enumerate(roles) if r[0] == "t"]
    rest = [i for i, r in enumerate(roles) if r in (C, S)]
    if len(rows) == 1 and len(cols) == 1 and not toks and len(rest) == 1 and len(roles) == 4 and rows[0] < cols[0]:
        return Layout(4, batch, rest[0], rows[0], cols[0], grid=(int(shape[rows[0]]), int(shape[cols[0]])))
    if len(toks) == 1 and not rows and not cols and len(rest) == 1 and len(roles) == 3:
        _, p, gh, gw = roles[toks[0]]
        return Layout(3, batch, rest[0], token=toks[0], prefix=p, grid=(gh, gw))
    return None


# --- sizes -------------------------------------------------------------------------------------------------------

def _size(s: Any, bsym: Any) -> int | None:
    """An int for a (possibly symbolic) size; the batch symbol counts as a large prime, other symbols are None."""
    if isinstance(s, int):
        return s
    expr = s.node.expr
    if bsym is not None:
        expr = expr.subs(bsym, _BIG)
    return int(expr) if expr.is_number else None


def _shape(val: Any, bsym: Any) -> list[int | None]:
    return [_size(s, bsym) for s in val.shape]


def _is_batch(s: Any, bsym: Any) -> bool:
    return bsym is not None and not isinstance(s, int) and s.node.expr == bsym


# --- merges ------------------------------------------------------------------------------------------------------

def merge(roles: Sequence[Role]) -> Role:
    """Roles of operands at one broadcast axis -> the result's role (see the module docstring)."""
    grid = {r for r in roles if r[0] in _GRID}
    if grid:
        return grid.pop() if len(grid) == 1 else U
    if U in roles:
        return U
    return S if S in roles else C


def _broadcast(node: fx.Node, env: dict, bsym: Any) -> Roles:
    """Elementwise ops: right-aligned broadcasting of every tensor operand's roles."""
    out = node.meta["val"]
    nd = out.ndim
    cols: list[list[Role]] = [[] for _ in range(nd)]
    ones: list[list[Role]] = [[] for _ in range(nd)]  # operands broadcast along the axis (size 1)
    for a in _tensor_args(node):
        r, v = env.get(a), a.meta.get("val")
        if not isinstance(r, list) or not r or not isinstance(r[0], tuple) or v is None:
            continue
        for i, (role, size) in enumerate(zip(r[::-1], v.shape[::-1])):
            (ones if isinstance(size, int) and size == 1 else cols)[nd - 1 - i].append(role)
    return [merge(c) if c else merge(o) if o else C for c, o in zip(cols, ones)]


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _view(in_roles: Roles, in_shape: list, out_shape: list) -> Roles:
    """Roles through a reshape: axes grouped where the products of sizes agree (size-1 axes are C)."""
    out: Roles = [C] * len(out_shape)
    if any(s is None for s in in_shape + out_shape):
        return [U] * len(out_shape)
    ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = ins[i][1], outs[j][1]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(ins[i])
                pi *= ins[i][1]
                i += 1
            elif pj < pi and j < len(outs):
                gj.append(outs[j])
                pj *= outs[j][1]
                j += 1
            else:
                return [U] * len(out_shape)
        roles = _regroup([in_roles[a] for a, _ in gi], [s for _, s in gj], [s for _, s in gi])
        for (a, _), r in zip(gj, roles):
            out[a] = r
    return out


def _regroup(rin: list[Role], sizes: list[int], in_sizes: list[int]) -> list[Role]:
    """Roles of the output axes ``sizes`` formed from input axes with roles ``rin`` (one view group)."""
    if len(rin) == 1 and len(sizes) == 1:
        return rin
    if len(sizes) == 1:  # merge
        kinds = [r[0] for r in rin]
        if all(k in ("c", "s") for k in kinds):
            return [S] if all(k == "s" for k in kinds) else [C]  # positions inside a window stay positions
        if rin == [H0, W0]:
            return [("t", 0, None, None)]  # sizes filled by the caller from the input shape
        if len(rin) == 2 and rin[0][0] in ("h", "w") and rin[1] == S:
            return [rin[0]]  # a split row merged back (window reverse, depth-to-space)
        if U not in rin:
            # e.g. (batch, tokens) flattened for a BatchNorm1d and reshaped back: remembered, restored on split
            return [("m", tuple(rin), tuple(in_sizes))]
        return [U]
    if len(rin) == 1:  # split
        r = rin[0]
        if r in (C, S):
            return [r] * len(sizes)
        if r[0] == "m" and list(r[2]) == list(sizes):
            return list(r[1])
        if r[0] == "t" and r[1] == 0 and list(sizes) == [r[2], r[3]]:
            return [H0, W0]
        if r[0] in ("h", "w") and r[1] == 0:
            return [r] + [S] * (len(sizes) - 1)  # row-major: the first axis is the coarse position
        return [U] * len(sizes)
    return [C] * len(sizes) if all(r[0] in ("c", "s") for r in rin) else [U] * len(sizes)


def _fill_tokens(roles: Roles, in_roles: Roles, in_shape: list) -> Roles:
    """Give merged (h, w) token roles their grid size from the input's row and column axes."""
    if not any(r[0] == "t" and r[2] is None for r in roles):
        return roles
    gh = next(s for r, s in zip(in_roles, in_shape) if r == H0)
    gw = next(s for r, s in zip(in_roles, in_shape) if r == W0)
    return [("t", 0, gh, gw) if r[0] == "t" and r[2] is None else r for r in roles]


# --- per-op rules --------------------------------------------------------------------------------------------------

def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dims(d: Any, nd: int) -> list[int]:
    if d is None:
        return list(range(nd))
    d = [d] if isinstance(d, int) else list(d)
    return [x % nd for x in d] if nd else []


def _rule_view(node, env, bsym):
    src = node.args[0]
    ins, outs = _shape(src.meta["val"], bsym), _shape(node.meta["val"], bsym)
    return _fill_tokens(_view(env[src], ins, outs), env[src], ins)


def _rule_permute(node, env, bsym):
    r = env[node.args[0]]
    return [r[d % len(r)] for d in node.args[1]]


def _rule_transpose(node, env, bsym):
    r = list(env[node.args[0]])
    if len(r) < 2:
        return r
    a, b = (node.args[1] % len(r), node.args[2] % len(r)) if len(node.args) > 2 else (0, 1)
    r[a], r[b] = r[b], r[a]
    return r


def _rule_unsqueeze(node, env, bsym):
    r = list(env[node.args[0]])
    d = node.args[1] % (len(r) + 1)
    return r[:d] + [C] + r[d:]


def _rule_squeeze(node, env, bsym):
    src = node.args[0]
    r, shape = env[src], _shape(src.meta["val"], bsym)
    dims = _dims(_arg(node, 1, "dim"), len(r))
    return [role for i, role in enumerate(r) if not (i in dims and shape[i] == 1)]


def _rule_expand(node, env, bsym):
    src = node.args[0]
    r, ins = env[src], _shape(src.meta["val"], bsym)
    outs = _shape(node.meta["val"], bsym)
    lead = len(outs) - len(r)
    return [C] * lead + [role if s_in == s_out else C for role, s_in, s_out in zip(r, ins, outs[lead:])]


def _rule_repeat(node, env, bsym):
    src = node.args[0]
    r = env[src]
    reps = list(node.args[1])
    lead = len(reps) - len(r)
    return [C] * lead + [role if n == 1 or role == C else U for role, n in zip(r, reps[lead:])]


def _rule_select(node, env, bsym):
    r = list(env[node.args[0]])
    del r[node.args[1] % len(r)]
    return r


def _rule_slice(node, env, bsym):
    src = node.args[0]
    r = list(env[src])
    d = _arg(node, 1, "dim", 0) % len(r)
    start = _arg(node, 2, "start", None) or 0
    step = _arg(node, 4, "step", 1)
    n_in = _shape(src.meta["val"], bsym)[d]
    n_out = _shape(node.meta["val"], bsym)[d]
    role = r[d]
    if n_in is not None and n_out == n_in:
        return r  # the whole axis
    if not isinstance(start, int) or not isinstance(step, int):
        r[d] = U if role[0] in _GRID else role
        return r
    start = start % n_in if n_in and start < 0 else start
    if step != 1:
        # every step-th row from an offset inside the first cell (Swin's patch merging): a coarser, aligned grid
        r[d] = role if role[0] in ("h", "w") and role[1] == 0 and 0 <= start < step else (
            role if role in (C, S) else U)
        return r
    if role[0] == "t":
        _, p, gh, gw = role
        if start + (n_out or 0) <= p:
            r[d] = C  # prefix tokens only
        elif start <= p and n_out == p - start + gh * gw:
            r[d] = ("t", p - start, gh, gw)
        else:
            r[d] = U
    elif role[0] in ("h", "w"):
        r[d] = role if start == 0 and role[1] == 0 else U  # cropping padding at the end keeps the alignment
    elif role == B:
        r[d] = U
    return r


def _rule_cat(node, env, bsym):
    parts = [a for a in node.args[0] if isinstance(a, fx.Node)]
    nd = node.meta["val"].ndim
    d = _arg(node, 1, "dim", 0) % nd
    per = [env[a] for a in parts if len(env[a]) == nd]
    out = [merge([r[i] for r in per]) if i != d else None for i in range(nd)]
    roles = [r[d] for r in per]
    sizes = [_shape(a.meta["val"], bsym)[d] for a in parts if len(env[a]) == nd]
    grid = [i for i, r in enumerate(roles) if r[0] in _GRID]
    if not grid:
        out[d] = U if U in roles else C
    elif len(grid) == 1 and roles[grid[0]][0] == "t" and grid[0] == len(roles) - 1 and all(
            r in (C, S) for r in roles[:-1]) and None not in sizes:
        _, p, gh, gw = roles[-1]
        out[d] = ("t", p + sum(sizes[:-1]), gh, gw)  # prefix tokens concatenated in front of a grid
    else:
        out[d] = U
    return out


def _rule_stack(node, env, bsym):
    parts = [a for a in node.args[0] if isinstance(a, fx.Node)]
    d = _arg(node, 1, "dim", 0)
    nd = node.meta["val"].ndim
    d = d % nd
    base = [merge([env[a][i] for a in parts]) for i in range(nd - 1)]
    return base[:d] + [C] + base[d:]


def _rule_split(node, env, bsym):
    """split / split_with_sizes / chunk / unbind -> a list of roles per piece."""
    src = node.args[0]
    r = env[src]
    vals = node.meta["val"]
    name = _name(node)
    d = (_arg(node, 1, "dim", 0) if name == "unbind" else _arg(node, 2, "dim", 0)) % len(r)
    if name == "unbind":
        return [r[:d] + r[d + 1:] for _ in vals]
    out, start = [], 0
    for v in vals:
        n = _size(v.shape[d], bsym)
        piece = list(r)
        role = r[d]
        if role[0] == "t" and n is not None:
            _, p, gh, gw = role
            piece[d] = C if start + n <= p else (("t", p - start, gh, gw) if start <= p and n == p - start + gh * gw
                                                   else U)
        elif role[0] in _GRID and len(vals) > 1:
            piece[d] = U
        out.append(piece)
        start += n or 0
    return out


def _rule_getitem(node, env, bsym):
    src, i = node.args
    r = env.get(src)
    if isinstance(r, list) and r and isinstance(r[0], list):
        return r[i] if i < len(r) else None
    return None


def _rule_reduce(node, env, bsym):
    """mean / sum / amax / ... over dims (keepdim leaves a size-1 C axis)."""
    r = env[node.args[0]]
    name = _name(node)
    dim_i, keep_i = (1, 2)
    dims = _dims(_arg(node, dim_i, "dim"), len(r))
    keep = _arg(node, keep_i, "keepdim", False)
    if name in ("max", "min") and isinstance(node.meta["val"], (tuple, list)):  # max.dim -> (values, indices)
        one = [C if i in dims else role for i, role in enumerate(r)] if keep else \
            [role for i, role in enumerate(r) if i not in dims]
        return [one, one]
    if keep:
        return [C if i in dims else role for i, role in enumerate(r)]
    return [role for i, role in enumerate(r) if i not in dims]


def _rule_linear(node, env, bsym):
    r = list(env[node.args[0]])
    return r[:-1] + [C]


def _rule_matmul(node, env, bsym):
    a, b = node.args[0], node.args[1]
    ra, rb = env[a], env[b]
    nd = node.meta["val"].ndim
    if len(ra) < 2 or len(rb) < 2:
        return [C] * nd if all(r == C for r in ra + rb) else [U] * nd
    batch_a, batch_b = ra[:-2], rb[:-2]
    k = nd - 2
    lead = []
    for i in range(k):
        ia, ib = i - (k - len(batch_a)), i - (k - len(batch_b))
        lead.append(merge(([batch_a[ia]] if ia >= 0 else []) + ([batch_b[ib]] if ib >= 0 else [])))
    return lead + [ra[-2], rb[-1]]


def _rule_addmm(node, env, bsym):
    ra, rb = env[node.args[1]], env[node.args[2]]
    return [ra[0], rb[-1]]


def _rule_baddbmm(node, env, bsym):
    ra, rb = env[node.args[1]], env[node.args[2]]
    return [merge([ra[0], rb[0]]), ra[1], rb[2]]


def _rule_einsum(node, env, bsym):
    eq, ops = node.args[0], node.args[1]
    ins, out = eq.replace(" ", "").split("->")
    letters: dict[str, list[Role]] = {}
    for spec, a in zip(ins.split(","), ops):
        if "." in spec:
            return [U] * node.meta["val"].ndim
        for ch, role in zip(spec, env[a]):
            letters.setdefault(ch, []).append(role)
    return [merge(letters.get(ch, [C])) for ch in out]


def _rule_conv(node, env, bsym):
    r = env[node.args[0]]
    nd = node.meta["val"].ndim
    if len(r) == 4 and nd == 4:
        return [r[0], C] + [role if role[0] == kind or role in (C, S) else U for role, kind in zip(r[2:], "hw")]
    if len(r) == nd:
        return [r[0], C] + [role if role in (C, S) else U for role in r[2:]]
    return [U] * nd


def _rule_spatial(node, env, bsym):
    """Pooling, upsampling, padding: positions stay positions (a 1x1 result is no longer a grid)."""
    r = list(env[node.args[0]])
    shape = _shape(node.meta["val"], bsym)
    if len(r) != len(shape):
        return [U] * len(shape)
    return [C if (role[0] in ("h", "w", "t") and s == 1) else role for role, s in zip(r, shape)]


def _rule_roll(node, env, bsym):
    src = node.args[0]
    r, shape = list(env[src]), _shape(src.meta["val"], bsym)
    shifts = _arg(node, 1, "shifts")
    dims = _arg(node, 2, "dims", [])
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return [U if role[0] in _GRID else role for role in r]
    for s, d in zip(shifts, dims):
        d = d % len(r)
        role = r[d]
        if role[0] in ("h", "w") and isinstance(s, int) and shape[d]:
            r[d] = (role[0], (role[1] + s) % shape[d])
        elif role[0] in _GRID:
            r[d] = U
    return r


def _rule_same(node, env, bsym):
    """Shape-preserving ops on their first tensor argument (norms, softmax, dropout, type casts)."""
    return list(env[_tensor_args(node)[0]])


def _rule_norm_tuple(node, env, bsym):
    r = list(env[_tensor_args(node)[0]])
    return [r] + [[U] * v.ndim if isinstance(v, torch.Tensor) else None for v in node.meta["val"][1:]]


def _rule_sdpa(node, env, bsym):
    q, k, v = node.args[:3]
    rq, rk, rv = env[q], env[k], env[v]
    lead = [merge([a, b, c]) for a, b, c in zip(rq[:-2], rk[:-2], rv[:-2])]
    return lead + [rq[-2], rv[-1]]


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def _unfold_grid(h: int, w: int, node: fx.Node, first: int) -> tuple[int, int]:
    """Positions of ``F.unfold``'s sliding blocks along (h, w): args (kernel, dilation, padding, stride)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = (_pair(node.args[first + i]) for i in range(4))
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _rule_im2col(node, env, bsym):
    """``F.unfold``: (B, C, H, W) -> (B, C*kh*kw, L), L the blocks' positions on an (h, w) grid, row-major."""
    src = node.args[0]
    r, shape = env[src], _shape(src.meta["val"], bsym)
    if len(r) != 4 or r[2] != H0 or r[3] != W0:
        return [U] * node.meta["val"].ndim
    gh, gw = _unfold_grid(shape[2], shape[3], node, 1)
    return [r[0], C, ("t", 0, gh, gw)]


def _rule_col2im(node, env, bsym):
    """``F.fold``: (B, C*kh*kw, L) -> (B, C, H, W) when L is the grid of positions of that fold."""
    src = node.args[0]
    r = env[src]
    out = node.meta["val"]
    if len(r) != 3 or r[2][0] != "t" or r[2][1] != 0:
        return [U] * out.ndim
    h, w = (int(v) for v in node.args[1])
    if _unfold_grid(h, w, node, 2) != (r[2][2], r[2][3]):
        return [U] * out.ndim
    return [r[0], C, H0, W0]


def _rule_const(node, env, bsym):
    return [C] * node.meta["val"].ndim


def _rule_gather(node, env, bsym):
    """Indexing, gathering, shuffles: tables of parameters (relative position biases) stay non-grid; anything
    that moves positions around becomes unknown."""
    roles = [r for a in _tensor_args(node) for r in (env.get(a) or [])]
    nd = node.meta["val"].ndim
    return [C] * nd if all(r in (C, S) for r in roles) else [U] * nd


_RULES: dict[str, Callable] = {
    **dict.fromkeys(["view", "_unsafe_view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"], _rule_view),
    **dict.fromkeys(["permute"], _rule_permute),
    **dict.fromkeys(["transpose", "swapaxes", "t"], _rule_transpose),
    "unsqueeze": _rule_unsqueeze,
    "squeeze": _rule_squeeze,
    **dict.fromkeys(["expand", "expand_as"], _rule_expand),
    "repeat": _rule_repeat,
    "select": _rule_select,
    "slice": _rule_slice,
    **dict.fromkeys(["cat", "concat", "concatenate"], _rule_cat),
    "stack": _rule_stack,
    **dict.fromkeys(["split", "split_with_sizes", "chunk", "unbind", "tensor_split"], _rule_split),
    **dict.fromkeys(["mean", "sum", "amax", "amin", "max", "min", "linalg_vector_norm", "norm", "var", "std",
                     "logsumexp", "prod"], _rule_reduce),
    "linear": _rule_linear,
    **dict.fromkeys(["matmul", "bmm", "mm"], _rule_matmul),
    "addmm": _rule_addmm,
    "baddbmm": _rule_baddbmm,
    "einsum": _rule_einsum,
    **dict.fromkeys(["conv2d", "convolution", "conv1d", "_convolution", "conv_transpose2d"], _rule_conv),
    **dict.fromkeys(["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "pad", "avg_pool1d",
                     "max_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
                     "constant_pad_nd", "reflection_pad2d", "replication_pad2d", "upsample_bilinear2d",
                     "upsample_nearest2d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
                     "_upsample_bilinear2d_aa", "max_pool2d_with_indices"], _rule_spatial),
    "roll": _rule_roll,
    **dict.fromkeys(["layer_norm", "batch_norm", "group_norm", "rms_norm", "instance_norm", "softmax",
                     "log_softmax", "_softmax", "dropout", "feature_dropout", "alpha_dropout", "native_dropout",
                     "_native_batch_norm_legit_no_training", "clone", "contiguous", "alias", "detach",
                     "lift_fresh_copy", "to", "_to_copy", "type_as", "copy", "fill", "zero", "masked_fill",
                     "hardtanh", "clamp", "clamp_min", "clamp_max", "leaky_relu", "elu", "celu", "gelu",
                     "silu", "mish", "hardswish", "hardsigmoid", "relu", "relu6", "sigmoid", "tanh",
                     "softplus", "prelu"], _rule_same),
    **dict.fromkeys(["native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_functional", "native_group_norm"], _rule_norm_tuple),
    "scaled_dot_product_attention": _rule_sdpa,
    **dict.fromkeys(["arange", "zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty",
                     "zeros_like", "ones_like", "full_like", "empty_like", "scalar_tensor", "eye", "rand",
                     "randn", "tensor"], _rule_const),
    "im2col": lambda node, env, bsym: _rule_im2col(node, env, bsym),
    "col2im": lambda node, env, bsym: _rule_col2im(node, env, bsym),
    **dict.fromkeys(["index", "gather", "index_select", "repeat_interleave", "flip",
                     "pixel_shuffle", "pixel_unshuffle", "take_along_dim"], _rule_gather),
}


def _name(node: fx.Node) -> str:
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))


def _pointwise(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags


def _rule_for(node: fx.Node) -> Callable:
    if node.target is operator.getitem:
        return _rule_getitem
    name = _name(node)
    rule = _RULES.get(name) or _RULES.get(name.rstrip("_"))
    if rule is not None:
        return rule
    if _pointwise(node):
        return _broadcast
    return _rule_fallback


def _rule_fallback(node, env, bsym):
    """An op without a rule: shape-preserving on its first tensor argument keeps its roles, else unknown."""
    val = node.meta["val"]
    args = _tensor_args(node)
    if isinstance(val, torch.Tensor) and args and tuple(args[0].meta["val"].shape) == tuple(val.shape):
        return _broadcast(node, env, bsym)
    if isinstance(val, (tuple, list)):
        return [[U] * v.ndim if isinstance(v, torch.Tensor) else None for v in val]
    return [U] * val.ndim if isinstance(val, torch.Tensor) else None


def propagate(graph: fx.Graph, x: fx.Node, bsym: Any = None) -> dict[fx.Node, Any]:
    """Roles of every tensor-valued node of ``graph`` whose input image is the placeholder ``x``.

    bsym: the batch size symbol of a dynamic-batch capture (axes of exactly that size are the batch), or None.
    Other placeholders (parameters, buffers, constants) have no grid axes. Nodes that are not tensors get None.
    """
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            env[node] = [B, C, H0, W0] if node is x else ([C] * val.ndim if isinstance(val, torch.Tensor) else None)
            continue
        if node.op != "call_function" or val is None:
            env[node] = None
            continue
        if not isinstance(val, (torch.Tensor, tuple, list)):
            env[node] = None
            continue
        try:
            roles = _rule_for(node)(node, env, bsym)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration):
            # an op used in a way its rule does not cover: its value is never a cut, nothing is guessed
            roles = [U] * val.ndim if isinstance(val, torch.Tensor) else [
                [U] * v.ndim if isinstance(v, torch.Tensor) else None for v in val]
        if isinstance(val, torch.Tensor) and isinstance(roles, list):
            roles = _with_batch(roles, val, bsym)
        env[node] = roles
    return env


def _holds_batch(role: Role) -> bool:
    return role == B or (role[0] == "m" and any(_holds_batch(r) for r in role[1]))


def _with_batch(roles: Roles, val: torch.Tensor, bsym: Any) -> Roles:
    """Axes whose size is exactly the batch symbol are the batch; axes that multiply it mix the batch in."""
    if len(roles) != val.ndim:
        return [U] * val.ndim
    if bsym is None:
        return roles
    out = []
    for role, s in zip(roles, val.shape):
        if _is_batch(s, bsym):
            out.append(B)
        elif not isinstance(s, int) and bsym in s.node.expr.free_symbols:
            out.append(role if _holds_batch(role) else U)
        else:
            out.append(U if role == B else role)
    return out
