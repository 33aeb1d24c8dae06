"""Any vision model, no layer names (issue 15): family by family, each map against the oracles of tests/_oracle.py.

For each family of the zoo (``ZOO`` in tests/conftest.py) a tiny random model (``pretrained=False``, Hugging Face
from tiny configs; every all-zero parameter tensor filled with small noise first, since libraries zero-initialise
heads, layer scales and post-norms), run in float64 with B = 2:

* the cut: ``funcam.split(model).layers`` is what a user would pick (the last stage of a CNN, the block's first
  norm before the last attention of a CLS-pooled ViT, the final tokens of an average-pooled transformer, ...);
* ``head(extract(x)) == model(x)``, every output tensor;
* the loop oracle on the same cut: ``funcam.cam(sp, x, K classes)`` for Grad-CAM, Grad-CAM++ and HiResCAM equals a
  per-class ``torch.autograd.grad`` of ``sp.head`` w.r.t. the extracted map with each rule written out by hand;
* the hook oracle on the unmodified model (where the cut names a submodule): that module's output captured with a
  forward hook, its gradient from ``model(x)``, turned into ``(B, C, h, w)`` by hand (the zoo's ``to_map``)
  (tokens with p prefix tokens on a gh x gw grid, NHWC, NCHW), so funcam's layout inference (prefix count, grid,
  channels-last) is checked independently; for timm's ``forward_features`` route the same with
  ``forward_features`` / ``forward_head``;
* maps are never all zero. Non-square inputs for token models (MLP-Mixer, DeiT3, EVA02) and channels-last models
  (MambaOut, torchvision Swin), so that a transposed grid cannot pass.

Attention relevance (``attention_rollout``, ``grad_rollout``, ``chefer_relevance``) is checked against the
model's own forward with every attention recomputed explicitly inside a ``TorchFunctionMode`` (``AttentionTaps``:
the probabilities of ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward`` and explicit softmaxes,
with a zero-valued tap added so that a per-class ``autograd.grad`` gives the gradient at the probabilities) and
rollout's rules written as full matrix products.

Tolerances (float64): |funcam - oracle| <= 1e-9 * max|oracle| (observed below 1e-13); ``head(extract(x))`` vs
``model(x)``: 1e-10 (the graph's explicit attention vs the fused kernel).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torchvision
from einops import rearrange
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import funcam
from tests._oracle import (
    attention_grads,
    class_grads,
    cut_loop,
    features_grads,
    hook_grads,
    hooked_forward,
    logits_of,
    nchw,
    nhwc,
    relevance_matrix,
    rollout_loop,
    rule,
    tokens,
)
from tests.conftest import ZOO, ZOO_CLASSES, hf_model, make_zoo_model, noised, noised_double, timm_model, tv_model

N_CLASSES = ZOO_CLASSES
CLASSES = [0, 2, 4]  # K = 3 of 5
TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ---------------------------------------------------------------------------------------------------------------------
# The zoo (tests/conftest.py): each family's model, input, and split, built once per module
# ---------------------------------------------------------------------------------------------------------------------

TIMM_FEATURES_ROUTE = {"timm_mambaout", "timm_swinv2", "timm_tresnet"}  # forward_features, not a submodule
NOT_GRAPH_ROUTE = TIMM_FEATURES_ROUTE | {"timm_deit3"}  # timm's own splits: no capture, no example=


class Built(NamedTuple):
    model: nn.Module
    x: Tensor
    sp: funcam.Split


class Zoo:
    """Models, inputs and splits built once per module, on first use."""

    def __init__(self):
        self._built: dict[str, Built | Exception] = {}

    def __getitem__(self, name: str) -> Built:
        if name not in self._built:
            model, x = make_zoo_model(name)
            try:
                sp = funcam.split(model) if name in NOT_GRAPH_ROUTE else funcam.split(model, example=x)
            except ValueError as e:  # an xfail family: every test of it fails the same way, without a re-capture
                self._built[name] = e
            else:
                self._built[name] = Built(model, x, sp)
        got = self._built[name]
        if isinstance(got, Exception):
            raise got
        return got


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


# The zoo's costliest captures (5-10 s each on the 2-core VM) run in the slow set; the fast set keeps at least one
# model of every library and layout (torchvision / Hugging Face / timm; NCHW, NHWC, tokens with and without prefix
# tokens, windows): Twins, MaxViT, MobileNetV3, EfficientFormer, XCiT, VOLO, PiT, TNT, CrossViT, CaiT, HF Swin.
SLOW_ZOO = {"timm_twins", "tv_maxvit", "tv_mobilenet_v3", "timm_efficientformer", "timm_xcit", "timm_volo", "timm_pit",
            "timm_tnt", "timm_crossvit", "timm_cait", "hf_swin"}


def _params(names) -> list:
    out = []
    for n in names:
        fam = ZOO[n]
        marks = ([pytest.mark.slow] if fam.slow or n in SLOW_ZOO else []) + (
            [pytest.mark.xfail(strict=True, reason=fam.xfail)] if fam.xfail else [])
        out.append(pytest.param(n, marks=marks, id=n))
    return out


ALL = _params(ZOO)
MODULE_CUTS = _params([n for n in ZOO if n not in TIMM_FEATURES_ROUTE])


# ---------------------------------------------------------------------------------------------------------------------
# Scores and comparisons (the oracles are tests/_oracle.py's)
# ---------------------------------------------------------------------------------------------------------------------

def class_scores(classes: list[int]) -> Callable[[Any], Tensor]:
    return lambda out: logits_of(out)[:, classes]


def assert_maps(got: Tensor, want: Tensor, tol: float = TOL) -> None:
    """Equal up to tol * the largest |value| of the oracle, and not all zero."""
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    scale = float(want.abs().max())
    assert scale > 0 and torch.count_nonzero(got) > 0, "all-zero map"
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} (scale {scale:.3g})"


def assert_outputs(got: Any, want: Any, atol: float = 1e-10) -> None:
    gl = [t for t in pytree.tree_leaves(got) if isinstance(t, Tensor)]
    wl = [t for t in pytree.tree_leaves(want) if isinstance(t, Tensor)]
    assert type(got) is type(want) and len(gl) == len(wl) > 0
    for g, w in zip(gl, wl):
        torch.testing.assert_close(g, w, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------------
# Every family: the cut, the invariant, the loop oracle, the hook oracle
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_default_cut(zoo, name):
    built = zoo[name]
    assert built.sp.layers == ZOO[name].layers
    if name not in TIMM_FEATURES_ROUTE:
        assert built.sp.layers[0] in dict(built.model.named_modules())  # a name the user can look up


@pytest.mark.slow  # funcam.split's first-use check asserts the same on every zoo model the fast set splits
@pytest.mark.parametrize("name", ALL)
def test_head_of_extract_is_the_model(zoo, name):
    model, x, sp = zoo[name]
    with torch.no_grad():
        assert_outputs(sp.head(sp.extract(x)), model(x))
    funcam.check_split(sp, x, model, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_maps_equal_loop_oracle(zoo, name):
    model, x, sp = zoo[name]
    a, g = cut_loop(sp, x, class_scores(CLASSES))
    for method in ("gradcam", "gradcampp", "hirescam"):
        got = funcam.cam(sp, x, CLASSES, method=method, relu=False)
        assert_maps(got.maps, rule(method, g, a[:, None]))
        torch.testing.assert_close(got.logits, logits_of(model(x)), rtol=0, atol=1e-10)


@pytest.mark.slow  # the same cuts' maps are compared with the loop oracle in the fast set (test_maps_equal_loop_oracle)
@pytest.mark.parametrize("name", MODULE_CUTS)
def test_maps_equal_hook_grads(zoo, name):
    """The cut module's output and gradient from the unmodified model, its layout written by hand."""
    model, x, sp = zoo[name]
    fam = ZOO[name]
    a, g = hook_grads(model, x, fam.layers[0], fam.to_map, class_scores(CLASSES))
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


@pytest.mark.parametrize("name", _params(sorted(TIMM_FEATURES_ROUTE)))
def test_maps_equal_forward_features_grads(zoo, name):
    """timm's feature-map route (NCHW, and NHWC for MambaOut and SwinV2) against forward_features/forward_head."""
    model, x, sp = zoo[name]
    a, g = features_grads(model, x, ZOO[name].to_map, CLASSES)
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


def test_grids_follow_non_square_inputs(zoo):
    """The map's grid follows the input's (h, w), not (w, h), for token and channels-last features: the maps equal
    the oracle's, whose layout (tokens row-major on a gh x gw grid, NHWC) is written by hand in the zoo."""
    for name, grid in [("timm_mixer", (4, 8)), ("timm_deit3", (4, 8)), ("timm_eva02", (4, 8)),
                       ("timm_mambaout", (2, 4)), ("tv_swin", (4, 8))]:
        model, x, sp = zoo[name]
        assert x.shape[-2] < x.shape[-1]
        got = funcam.gradcam(sp, x, [1], relu=False)
        assert tuple(got.shape) == (2, 1) + grid, name
        fam = ZOO[name]
        a, g = (features_grads(model, x, fam.to_map, [1]) if name in TIMM_FEATURES_ROUTE else
                hook_grads(model, x, fam.layers[0], fam.to_map, class_scores([1])))
        assert_maps(got, rule("gradcam", g, a[:, None]))


def test_hf_swin_named_cut(zoo):
    """With layer= the Hugging Face Swin gives the same cut as its default."""
    fam = ZOO["hf_swin"]
    model, x = make_zoo_model("hf_swin")
    sp = funcam.split(model, "swin.layernorm", example=x)
    assert sp.layers == ("swin.layernorm",)
    assert_outputs(sp.head(sp.extract(x)), model(x))
    a, g = hook_grads(model, x, "swin.layernorm", fam.to_map, class_scores(CLASSES))
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


def test_hiera_is_refused():
    """Hiera unrolls its positions into mask units: no cut on the input's grid can be found, and split says so."""
    model, x = noised_double(functools.partial(timm_model, "hiera_tiny_224", num_classes=N_CLASSES, seed=None,
                                               img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), (64, 64))
    with pytest.raises(ValueError, match=r"no default cut for Hiera.*rearranges its positions.*pass layer="):
        funcam.split(model, example=x)


@pytest.mark.parametrize("name,layer,to_map", [
    ("hf_vit", "vit.layers.0.layernorm_after", tokens(1, 4, 4)),
    ("hf_dinov2", "dinov2.encoder.layer.0.norm1", tokens(1, 4, 4)),
    ("tv_vit", "encoder.layers.encoder_layer_0", tokens(1, 4, 4)),  # issue 15: crashed in the FX head
    pytest.param("tv_maxvit", "blocks.0", nchw, marks=pytest.mark.slow),  # issue 15: crashed in the FX head
    ("timm_eva02", "blocks.0", tokens(1, 4, 8)),
    ("timm_mambaout", "stages.3", nhwc),
])
def test_named_cuts_through_module_paths(name, layer, to_map):
    """layer= with a submodule path of any library: the same maps as a forward hook on that module."""
    model, x = make_zoo_model(name)
    sp = funcam.split(model, layer, example=x)
    assert sp.layers == (layer,)
    assert_outputs(sp.head(sp.extract(x)), model(x))
    a, g = hook_grads(model, x, layer, to_map, class_scores(CLASSES))
    assert_maps(funcam.gradcam(sp, x, CLASSES, relu=False), rule("gradcam", g, a[:, None]))


def test_named_cut_after_the_last_attention_of_a_cls_model_is_refused():
    """After the last attention of a CLS-pooled ViT only the CLS token reaches the logits: every map would be zero,
    and split says so instead of returning zeros."""
    model, x = make_zoo_model("tv_vit")
    with pytest.raises(ValueError, match=r"'encoder.layers.encoder_layer_1.ln_2' is exactly zero.*cut before it"):
        funcam.split(model, "encoder.layers.encoder_layer_1.ln_2", example=x)


def test_chained_named_cuts_hf_vit():
    """Two cuts on one path (multi-layer CAM): the earlier map's gradient is the total derivative, as a hook sees it."""
    model, x = make_zoo_model("hf_vit")
    names = ["vit.layers.0.layernorm_before", "vit.layers.1.layernorm_before"]
    sp = funcam.split(model, names, example=x)
    assert sp.layers == tuple(names)
    maps = funcam.gradcam(sp, x, CLASSES, relu=False)
    modules = [model.get_submodule(n) for n in names]
    feats, grads = class_grads(lambda t: hooked_forward(model, modules, t), x, class_scores(CLASSES))
    to_map = tokens(1, 4, 4)
    for got, a, g in zip(maps, feats, grads, strict=True):
        assert_maps(got, rule("gradcam", torch.stack([to_map(g[:, k]) for k in range(len(CLASSES))], dim=1),
                              to_map(a)[:, None]))


def test_swinv2_at_timm_init_weights_is_not_cut_as_swin_v1():
    build = ZOO["timm_swinv2"].build
    torch.manual_seed(0)
    model = build().eval().double()  # timm's own initialisation: res-post-norm weights are 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sp = funcam.split(model)
    noised(model)  # weights loaded or trained after the split was made: the split reads them at every call
    with torch.no_grad():
        assert_outputs(sp.head(sp.extract(x)), model(x))
    a, g = features_grads(model, x, nhwc, CLASSES)
    assert_maps(funcam.gradcam(sp, x, CLASSES, relu=False), rule("gradcam", g, a[:, None]))


def test_zero_weights_after_the_cut_are_named_on_every_route():
    """A zeroed classifier: no input reaches the cut. The graph route's first-use check refuses the split (a structural
    zero for these weights); the timm route has no capture to check, so the call warns and returns the zero maps. Both
    name the all-zero weight tensor."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tv = tv_model("resnet18", num_classes=N_CLASSES)
    with torch.no_grad():
        tv.fc.weight.zero_()
    with pytest.raises(ValueError, match=r"no default cut for ResNet: .*reached by the gradient.*\(fc\.weight\)"):
        funcam.split(tv, example=x)
    tm = timm_model("resnet18", num_classes=N_CLASSES)
    with torch.no_grad():
        tm.fc.weight.zero_()
    with pytest.warns(funcam.ZeroMapWarning, match=r"exactly zero on this input.*all zero \(fc\.weight"):
        maps = funcam.gradcam(funcam.split(tm), x, [0, 1])
    assert maps.shape == (2, 2, 2, 2) and not bool(maps.any())  # fc.weight = 0: the exact answer is zero


def test_channels_last_feature_with_as_many_channels_as_positions():
    """C = 8 channels on an 8x8 grid of NHWC features: the layout is still read right (the maps equal the oracle's,
    whose NHWC layout is written by hand), not guessed from the sizes."""
    model, x = noised_double(functools.partial(timm_model, "mambaout_femto", num_classes=N_CLASSES, seed=None,
                                               depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)), (256, 256))
    sp = funcam.split(model)
    assert sp.layers == ("forward_features",)
    maps = funcam.gradcam(sp, x, CLASSES, relu=False)
    assert maps.shape == (2, len(CLASSES), 8, 8)
    a, g = features_grads(model, x, nhwc, CLASSES)
    assert_maps(maps, rule("gradcam", g, a[:, None]))


@pytest.mark.parametrize("name,size2", [("tv_resnet18", (96, 64)), ("tv_swin", (64, 32)),
                                        pytest.param("timm_twins", (64, 96), marks=pytest.mark.slow)])
def test_second_input_size_is_captured_and_correct(zoo, name, size2):
    """A graph-route split meets a new input size: captured again for it, same cut, maps equal the hook oracle."""
    model, _, sp = zoo[name]
    x2 = torch.randn(2, 3, *size2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fam = ZOO[name]
    to_map = tokens(0, size2[0] // 32, size2[1] // 32) if name == "timm_twins" else fam.to_map
    a, g = hook_grads(model, x2, fam.layers[0], to_map, class_scores(CLASSES))
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x2, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


@pytest.mark.parametrize("name,param", [("tv_resnet18", "layer4.1.conv2.weight"),
                                        ("hf_vit", "vit.layers.1.attention.q_proj.weight"),
                                        ("timm_beit", "blocks.0.mlp.fc1.weight")])
def test_maps_are_differentiable(zoo, name, param):
    """d(sum of Grad-CAM maps)/d(parameter) equals the double backward of the hook oracle."""
    model, x, sp = zoo[name]
    fam = ZOO[name]
    w = model.get_parameter(param)
    a, g = hook_grads(model, x, fam.layers[0], fam.to_map, class_scores([1, 3]), create_graph=True)
    (want,) = torch.autograd.grad(rule("gradcam", g, a[:, None]).sum(), w)
    (got,) = torch.autograd.grad(funcam.gradcam(sp, x, [1, 3], relu=False).sum(), w)
    assert_maps(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs that are not logits: segmentation (a dict) and embeddings, with score callables
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmentation():
    model, x = noised_double(lambda: tv_model("segmentation.lraspp_mobilenet_v3_large", num_classes=3, seed=None),
                             (64, 64))
    return model, x, funcam.split(model, example=x)


def test_segmentation_needs_a_score_callable(segmentation):
    model, x, sp = segmentation
    # LR-ASPP's last value on a grid before a layer with parameters: the high branch upsampled to the low branch's
    # 8x8 grid (an F.interpolate call, so a node name), read by high_classifier
    assert sp.layers == ("upsample_bilinear2d",)
    with torch.no_grad():
        assert_outputs(sp.head(sp.extract(x)), model(x))
    with pytest.raises(ValueError, match=r"OrderedDict with keys \['out'\].*pass classes= as a callable"):
        funcam.gradcam(sp, x, [1])


def test_segmentation_score_callable_equals_loop_oracle(segmentation):
    """"Class c inside this mask" for two classes, batched, against the per-class loop on the same cut."""
    model, x, sp = segmentation
    mask = torch.zeros(64, 64, dtype=torch.float64)
    mask[8:40, 16:56] = 1

    def score(out):  # (B, K): mean logit of classes 0 and 2 inside the mask
        return (out["out"][:, [0, 2]] * mask).sum(dim=(2, 3)) / mask.sum()

    a, g = cut_loop(sp, x, score)
    for method in ("gradcam", "gradcampp", "hirescam"):
        got = funcam.cam(sp, x, score, method=method, relu=False)
        assert_maps(got.maps, rule(method, g, a[:, None]))
        assert got.classes is None and isinstance(got.logits, dict)


@pytest.mark.slow
def test_deeplabv3_score_callable_equals_hook_grads():
    """torchvision DeepLabV3: cut before the final 1x1 classifier conv; "class c inside the mask" as scores."""
    model, x = noised_double(lambda: tv_model("segmentation.deeplabv3_mobilenet_v3_large", num_classes=3, seed=None),
                             (64, 64))
    sp = funcam.split(model, example=x)
    assert sp.layers == ("classifier.3",)
    mask = torch.zeros(64, 64, dtype=torch.float64)
    mask[20:60, 4:30] = 1

    def score(out):
        return (out["out"][:, [1, 2]] * mask).sum(dim=(2, 3)) / mask.sum()

    a, g = hook_grads(model, x, "classifier.3", nchw, score)
    for method in ("gradcam", "gradcampp", "hirescam"):
        assert_maps(funcam.cam(sp, x, score, method=method, relu=False).maps, rule(method, g, a[:, None]))


def _embedder(route: str) -> nn.Module:
    if route == "timm_features":
        return timm_model("resnet18", num_classes=0, seed=None)  # (B, 512) pooled features
    m = tv_model("resnet18", num_classes=1000, seed=None)
    m.fc = nn.Identity()
    return m


REFS = torch.randn(4, 512, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def similarity(emb: Tensor) -> Tensor:
    """(B, D) embeddings -> (B, 4) cosine similarities to the reference embeddings (CLIP-style prompts as classes)."""
    return F.normalize(emb, dim=1) @ F.normalize(REFS, dim=1).T


@pytest.mark.parametrize("route", ["timm_features", "graph"])
def test_embedding_similarity_equals_loop_oracle(route):
    """An embedding model (B, D) explained for its similarity to K reference embeddings."""
    model, x = noised_double(lambda: _embedder(route), (64, 64))
    if route == "timm_features":
        sp = funcam.split(model)
        assert sp.layers == ("forward_features",) and sp.pooled is not None  # the average-pool fast path
    else:
        sp = funcam.split(model, "layer4", example=x)  # the default cut (test_embedding_default_cut_is_the_last_stage)
    a, g = cut_loop(sp, x, similarity)
    for method in ("gradcam", "gradcampp", "hirescam"):
        got = funcam.cam(sp, x, similarity, method=method, relu=False)
        assert_maps(got.maps, rule(method, g, a[:, None]))
        assert got.classes is None
    ha, hg = hook_grads(model, x, "layer4", nchw, similarity)  # both routes name it layer4
    assert_maps(funcam.gradcam(sp, x, similarity, relu=False), rule("gradcam", hg, ha[:, None]))


def test_embedding_default_cut_is_the_last_stage():
    model, x = noised_double(lambda: _embedder("graph"), (64, 64))
    sp = funcam.split(model, example=x)
    assert sp.layers == ("layer4",)
    a, g = hook_grads(model, x, "layer4", nchw, similarity)
    assert_maps(funcam.gradcam(sp, x, similarity, relu=False), rule("gradcam", g, a[:, None]))


# ---------------------------------------------------------------------------------------------------------------------
# Attention relevance for any transformer, against the model's own forward with explicit, tapped attention
# (tests/_oracle.py: AttentionTaps, attention_grads, and the rules as matrix products)
# ---------------------------------------------------------------------------------------------------------------------

def patch_row(r: Tensor, readout: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """The readout row of R (B, N, N) at the patch columns: (B, gh, gw)."""
    return rearrange((readout @ r)[:, prefix:], "b (h w) -> b h w", h=grid[0], w=grid[1])


# name -> (readout row over N tokens, prefix, grid): CLS-pooled models read token 0, BEiT the mean of its patches
ROLLOUT = {
    "hf_vit": ("cls", 1, (4, 4)),
    "hf_deit": ("cls", 2, (4, 4)),  # DeiTForImageClassification reads the CLS token only; distillation is a prefix
    "tv_vit": ("cls", 1, (4, 4)),
    "timm_beit": ("patch_mean", 1, (4, 4)),
    "timm_deit3": ("cls", 1, (4, 8)),  # non-square
    "timm_eva02": ("patch_mean", 1, (4, 8)),  # rope, non-square
    "timm_naflexvit": ("patch_mean", 4, (4, 4)),  # 4 register tokens
}
ROLLOUT_SLOW = {"timm_naflexvit", "hf_deit"}


def _readout(kind: str, n: int, prefix: int) -> Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    if kind == "cls":
        e[0] = 1
    else:
        e[prefix:] = 1 / (n - prefix)
    return e


@pytest.fixture(scope="module")
def oracle_attn(zoo):
    cache = {}

    def get(name):
        if name not in cache:
            model, x, _ = zoo[name]
            cache[name] = attention_grads(model, x, CLASSES)
        return cache[name]

    return get


_ROLLOUT_PARAMS = [pytest.param(n, marks=[pytest.mark.slow] if n in ROLLOUT_SLOW else [], id=n) for n in ROLLOUT]


@pytest.mark.parametrize("name", _ROLLOUT_PARAMS)
def test_block_attentions_and_rollout(zoo, oracle_attn, name):
    model, x, sp = zoo[name]
    probs, _ = oracle_attn(name)
    got = funcam.block_attentions(sp, x)
    assert len(got) == len(probs) == 2
    for g, w in zip(got, probs):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    kind, prefix, grid = ROLLOUT[name]
    readout = _readout(kind, probs[0].shape[-1], prefix)
    want = patch_row(rollout_loop(probs), readout, prefix, grid)
    assert_maps(funcam.attention_rollout(sp, x)[:, 0], want)
    if name == "hf_vit":
        assert_maps(funcam.attention_rollout(model, x)[:, 0], want)  # the model itself: captured again, same maps


@pytest.mark.parametrize("name", _ROLLOUT_PARAMS)
def test_grad_rollout_and_chefer_equal_loop_oracle(zoo, oracle_attn, name):
    _, x, sp = zoo[name]
    probs, grads = oracle_attn(name)
    kind, prefix, grid = ROLLOUT[name]
    readout = _readout(kind, probs[0].shape[-1], prefix)
    gr, ch = (torch.stack([patch_row(relevance_matrix(probs, gs, rule), readout, prefix, grid) for gs in grads], dim=1)
              for rule in ("grad_rollout", "chefer"))
    assert_maps(funcam.grad_rollout(sp, x, CLASSES), gr)
    assert_maps(funcam.chefer_relevance(sp, x, CLASSES), ch)


@pytest.mark.parametrize("name,match", [
    ("tv_resnet18", "ResNet has no self-attention over its patch tokens"),
    ("tv_swin", "SwinTransformer also attends within windows"),  # windows only
    pytest.param("timm_swinv2", "SwinTransformerV2 also attends within windows",
                 marks=pytest.mark.slow),
])
def test_rollout_refuses_models_without_global_attention(zoo, name, match):
    model, x, sp = zoo[name]
    with pytest.raises(ValueError, match=match + ".*use funcam.gradcam"):
        funcam.attention_rollout(model, x)
    with pytest.raises(ValueError, match=match + ".*use funcam.gradcam"):
        funcam.grad_rollout(sp, x, [0])


def _hf_swin(size: int) -> tuple[nn.Module, Tensor]:
    """The zoo's hf_swin (32 px) at another image size."""
    return noised_double(functools.partial(hf_model, "SwinForImageClassification", "SwinConfig", num_labels=N_CLASSES,
                                           image_size=size, patch_size=4, embed_dim=16, depths=[1, 1],
                                           num_heads=[1, 2], window_size=4), (size, size))


@pytest.mark.slow
def test_rollout_refuses_hf_swin_windows():
    """64 px: both stages attend in 4x4 windows (4 windows in the last stage): no global attention, a clear error."""
    model, x = _hf_swin(64)
    with pytest.raises(ValueError, match="SwinForImageClassification also attends within windows"):
        funcam.attention_rollout(model, x)


def test_relevance_hf_swin_one_window_last_stage_is_refused():
    """32 px: stage 0 attends in four 4x4 windows, stage 1's 4x4 grid is one window. Relevance is refused with the
    clear ValueError of windowed attention (stage 0), never a RuntimeError from the kernel."""
    model, x = make_zoo_model("hf_swin")  # 32 px
    for fn in (funcam.grad_rollout, funcam.chefer_relevance):
        with pytest.raises(ValueError, match=r"SwinForImageClassification also attends within windows.*"
                                             r"use funcam.gradcam"):
            fn(model, x, [0, 1])


@pytest.mark.slow
def test_grad_rollout_cait_no_warning(zoo):
    _, x, sp = zoo["timm_cait"]
    maps = funcam.grad_rollout(sp, x, CLASSES)  # pytest turns the UserWarning into an error
    assert torch.count_nonzero(maps) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Promises: compiled equals eager without recompiles; the model untouched
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a full dynamo trace of a captured graph (10 s); tests/test_compile.py compiles the FX cut fast
def test_compiled_graph_route_equals_eager(zoo):
    _, x, sp = zoo["tv_resnet18"]
    assert sp.graph is not None  # a graph-route split captured at x's size
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda t: funcam.gradcam(sp, t, [1, 2], relu=False), fullgraph=True, backend=counter)
    want = funcam.gradcam(sp, x, [1, 2], relu=False)
    assert torch.count_nonzero(want) > 0
    torch.testing.assert_close(compiled(x), want, rtol=1e-12, atol=1e-12)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    torch.testing.assert_close(compiled(x2), funcam.gradcam(sp, x2, [1, 2], relu=False), rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1, "a second call with the same shapes recompiled"
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_vit", "tv_swin"])
def test_compiled_token_and_channels_last_graph_routes(zoo, name):
    _, x, sp = zoo[name]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda t: funcam.hirescam(sp, t, [1, 2], relu=False), fullgraph=True, backend=counter)
    for seed in (0, 9):
        xs = x if seed == 0 else torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        want = funcam.hirescam(sp, xs, [1, 2], relu=False)
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(compiled(xs), want, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1, "a second call with the same shapes recompiled"
    torch._dynamo.reset()


def test_training_mode_stochastic_depth_warns():
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                               window_size=[4, 4], stochastic_depth_prob=0.2, num_classes=N_CLASSES)
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    sp = funcam.split(model.eval(), example=x)
    model.train()
    with pytest.warns(funcam.TrainingModeWarning):
        funcam.gradcam(sp, x, [1])


def test_training_mode_default_cut_is_named():
    model, x = make_zoo_model("tv_resnet18")
    sp = funcam.split(model.train(), example=x)
    with pytest.warns(funcam.TrainingModeWarning):
        funcam.gradcam(sp, x, [1])
    assert sp.layers == ("layer4",)


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
              dict(getattr(m, "_state_dict_hooks", {}))) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()])


def _global_hooks():
    from torch.nn.modules import module as mm

    return (len(mm._global_forward_hooks), len(mm._global_forward_pre_hooks), len(mm._global_backward_hooks))


@pytest.mark.parametrize("name", ["tv_resnet18", "hf_vit", "timm_beit"])
def test_model_untouched(name):
    model, x = make_zoo_model(name)
    before, hooks = _snapshot(model), _global_hooks()
    sp = funcam.split(model, example=x)
    for method in ("gradcam", "gradcampp", "hirescam"):
        funcam.cam(sp, x, CLASSES, method=method)
    funcam.check_split(sp, x, model)
    if name != "tv_resnet18":
        funcam.attention_rollout(sp, x)
        funcam.chefer_relevance(sp, x, CLASSES)
    after = _snapshot(model)
    assert before[1] == after[1] and before[2] == after[2] and _global_hooks() == hooks
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
