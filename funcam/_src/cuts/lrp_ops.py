"""The kinds of ATen ops an LRP rule set tells apart, and the rule sets (``RULES``): what each kind becomes.

See ``funcam._src.cuts.lrp_graph`` for the rewrite that applies them. Op kinds are ATen overload packet names
(``aten.add_.Tensor`` -> "add_", in-place variants answered out of place).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor

from funcam._src.cuts import lrp_rules as R

PLAIN = frozenset("""view reshape view_as reshape_as _unsafe_view permute transpose t expand expand_as squeeze unsqueeze
flatten unflatten contiguous clone alias slice select narrow index_select index gather take_along_dim cat
stack split split_with_sizes chunk unsafe_chunk unsafe_split unbind roll flip repeat tile repeat_interleave
pad constant_pad_nd reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d pixel_shuffle
pixel_unshuffle unfold im2col col2im dropout native_dropout feature_dropout alpha_dropout to _to_copy
type_as lift_fresh_copy neg sum cumsum tril triu diagonal movedim swapaxes as_strided upsample_nearest1d
upsample_nearest2d upsample_nearest3d upsample_bilinear2d upsample_bicubic2d upsample_linear1d
_upsample_bilinear2d_aa _upsample_nearest_exact2d grid_sampler grid_sampler_2d channel_shuffle
native_channel_shuffle masked_fill where scatter scatter_add index_add index_put select_scatter
slice_scatter copy max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices
adaptive_max_pool1d adaptive_max_pool2d amax amin max min maximum minimum sort topk relu
leaky_relu prelu rrelu clamp clamp_min clamp_max abs threshold linear conv1d conv2d conv3d convolution
conv_transpose1d conv_transpose2d conv_transpose3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d mean add sub rsub mul div matmul bmm mm einsum baddbmm addmm addcmul
batch_norm softmax _softmax _safe_softmax getitem""".split())
# element-wise activations through the origin (act(0) = 0): the identity rule (ReLU6's clip too, where the gradient
# would lose the clipped part; ReLU's and leaky ReLU's gradient is the rule already); those that are not (sigmoid
# and the like, the gates of squeeze-excitation, gated units and ConViT) would divide by values near 0: held constant
ACTIVATIONS = frozenset("""relu6 hardtanh gelu silu tanh hardswish mish elu selu celu erf pow sin softsign tanhshrink
square log1p expm1""".split())
GATES = frozenset("sigmoid hardsigmoid exp softplus log_sigmoid cos log".split())
STATISTICS = frozenset("rsqrt sqrt var var_mean std std_mean linalg_vector_norm norm reciprocal frobenius_norm".split())
CONSTANT = frozenset("""zeros_like ones_like empty_like full_like rand_like randn_like new_zeros new_ones new_empty
new_full detach _assert_tensor_metadata""".split())
NORMS = frozenset("layer_norm rms_norm group_norm".split())
SOFTMAX = frozenset("softmax _softmax _safe_softmax".split())
PRODUCTS = frozenset("mul matmul bmm mm einsum baddbmm addmm addcmul".split())
CONVS = frozenset("conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d".split())
POOLS = frozenset("avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
                  "mean".split())
SUMS = frozenset(("add", "sub"))
# ops whose output is >= 0, and ops whose output is >= 0 when their input-dependent inputs are: a conv rule then
# skips the negative inputs' term (zero), one conv instead of two
NONNEG = frozenset("relu relu6 sigmoid hardsigmoid softmax _softmax _safe_softmax abs exp".split())
KEEPS_SIGN = frozenset("""view reshape _unsafe_view permute transpose t expand squeeze unsqueeze flatten unflatten
contiguous clone alias slice select index_select index gather cat stack split chunk unbind roll flip repeat
pad constant_pad_nd dropout to _to_copy max_pool1d max_pool2d max_pool3d max_pool2d_with_indices
adaptive_max_pool2d amax max avg_pool2d adaptive_avg_pool2d mean sum upsample_nearest2d upsample_bilinear2d
getitem add mul""".split())
# (op, argument positions) where a value constant w.r.t. the input enters an input-dependent one additively: biases,
# batch-norm means (and shifts), position embeddings, class tokens, attention biases; sums and concatenations take any
ADDITIVE_AT = {"linear": (2,), "layer_norm": (3,), "group_norm": (3,), "batch_norm": (2, 3), "baddbmm": (0,),
               "addmm": (0,), "addcmul": (0,), "scaled_dot_product_attention": (3,), "where": (1, 2)} | {
                   c: (2,) for c in CONVS}
ADDITIVE_ANY = frozenset("add sub rsub cat stack".split())


class RuleSet(NamedTuple):
    """What the ops of a captured graph become. cp: CP-LRP's constant attention probabilities. conv: the rule of
    conv layers (``lrp_rules`` z+, alpha-beta, gamma), None: their gradient. linear: LRP-epsilon at linear layers.
    first: the rule of the first layer reading the input (flat, z^B), ``first_ops`` the ops it applies to.
    canonize: zennit's layer map elsewhere (batch norm merged or passed, Norm at average pooling and residual sums).
    one: the explained score's relevance is 1 (zennit), not its value (lxt)."""

    name: str
    reference: str
    cp: bool = False
    conv: Callable | None = None
    linear: bool = False
    first: Callable | None = None
    first_ops: frozenset = CONVS
    canonize: bool = False
    one: bool = False


_ZENNIT = dict(linear=True, canonize=True, one=True)
RULES = {r.name: r for r in (
    RuleSet("attnlrp", "Achtibat et al. 2024 (AttnLRP), as lxt 2.1's efficient mode"),
    RuleSet("cplrp", "Ali et al. 2022 (CP-LRP), as lxt 2.1's efficient mode", cp=True),
    RuleSet("epsilon_plus", "zennit EpsilonPlus: z+ at conv, epsilon at linear layers", conv=R.zplus, **_ZENNIT),
    RuleSet("epsilon_plus_flat", "zennit EpsilonPlusFlat: EpsilonPlus, flat at the first layer", conv=R.zplus,
            first=R.flat, first_ops=CONVS | {"linear"}, **_ZENNIT),
    RuleSet("epsilon_alpha2_beta1", "zennit EpsilonAlpha2Beta1: alpha2-beta1 at conv, epsilon at linear layers",
            conv=R.alpha_beta, **_ZENNIT),
    RuleSet("epsilon_gamma_box", "zennit EpsilonGammaBox: z^B at the first conv, gamma 0.25 at the others, "
            "epsilon at linear layers", conv=R.gamma_rule, first=R.zbox, **_ZENNIT),
)}


def op_name(n: fx.Node) -> str:
    """``aten.add_.Tensor`` -> "add_"; ``operator.getitem`` -> "getitem"."""
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def where(n: fx.Node) -> str:
    """The node and the innermost module it ran in, for error messages: "gelu_3 in blocks.1.mlp.act (GELU)"."""
    stack = [(path, cls) for path, cls in (n.meta.get("nn_module_stack") or {}).values() if path]
    if not stack:
        return n.name
    path, cls = stack[-1]
    return f"{n.name} in {path} ({cls if isinstance(cls, str) else getattr(cls, '__qualname__', cls)})"


def bind(n: fx.Node) -> dict[str, Any]:
    """An ATen node's arguments by name, defaults filled in."""
    out = {}
    for i, a in enumerate(n.target._schema.arguments):
        if i < len(n.args):
            out[a.name] = n.args[i]
        elif a.name in n.kwargs:
            out[a.name] = n.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def functional(n: fx.Node) -> Any:
    """The out-of-place overload of an in-place ATen op (``relu_`` -> ``relu``), else the node's own target."""
    name = op_name(n)
    if not name.endswith("_") or name.startswith("_") or not isinstance(n.target, torch._ops.OpOverload):
        return n.target
    return getattr(getattr(torch.ops.aten, name[:-1]), n.target._overloadname)


def floating(n: Any) -> bool:
    """Whether a node's value holds floating tensors (the only values with gradients)."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return any(isinstance(t, Tensor) and t.is_floating_point() for t in pytree.tree_leaves(v))
