"""Any vision model, no layer names (issue 15): family by family, each map against oracles written here.

For each family a tiny random model (``pretrained=False``, Hugging Face from tiny configs; every all-zero
parameter tensor filled with small noise first, since libraries zero-initialise heads, layer scales and
post-norms), run in float64 with B = 2:

* the cut: ``funcam.split(model).layers`` is what a user would pick (the last stage of a CNN, the block's first
  norm before the last attention of a CLS-pooled ViT, the final tokens of an average-pooled transformer, ...);
* ``head(extract(x)) == model(x)``, every output tensor;
* the loop oracle on the same cut: ``funcam.cam(sp, x, K classes)`` for Grad-CAM, Grad-CAM++ and HiResCAM equals a
  per-class ``torch.autograd.grad`` of ``sp.head`` w.r.t. the extracted map with each rule written out by hand;
* the hook oracle on the unmodified model (where the cut names a submodule): that module's output captured with a
  forward hook, its gradient from ``model(x)``, turned into ``(B, C, h, w)`` here by hand from what the family is
  (tokens with p prefix tokens on a gh x gw grid, NHWC, NCHW), so funcam's layout inference (prefix count, grid,
  channels-last) is checked independently; for timm's ``forward_features`` route the same with
  ``forward_features`` / ``forward_head``;
* maps are never all zero. Non-square inputs for token models (MLP-Mixer, DeiT3, EVA02) and channels-last models
  (MambaOut, torchvision Swin), so that a transposed grid cannot pass.

Attention relevance (``attention_rollout``, ``grad_rollout``, ``chefer_relevance``) is checked against the
model's own forward with every attention recomputed explicitly inside a ``TorchFunctionMode`` (written here: the
probabilities of ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward`` and explicit softmaxes,
with a zero-valued tap added so that a per-class ``autograd.grad`` gives the gradient at the probabilities) and
the rules of ``funcam/rollout.py`` written as full matrix products.

Tolerances (float64): |funcam - oracle| <= 1e-9 * max|oracle| (observed below 1e-13); ``head(extract(x))`` vs
``model(x)``: 1e-10 (the graph's explicit attention vs the fused kernel).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import pytest
import timm
import timm.models.mlp_mixer
import timm.models.volo
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torchvision
from einops import rearrange
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.overrides import TorchFunctionMode
from torchvision.models.convnext import CNBlockConfig

import funcam
from tests._oracle import cut_loop as cut_oracle
from tests._oracle import rule
from tests.conftest import noised

transformers = pytest.importorskip("transformers")

N_CLASSES = 5
CLASSES = [0, 2, 4]  # K = 3 of 5
TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ---------------------------------------------------------------------------------------------------------------------
# Families: a builder, the input size, the expected cut, and how that cut's value becomes (B, C, h, w) by hand
# ---------------------------------------------------------------------------------------------------------------------

def tokens(prefix: int, gh: int, gw: int) -> Callable[[Tensor], Tensor]:
    """(B, prefix + gh*gw, C) tokens, prefix tokens first, patches row-major -> (B, C, gh, gw)."""
    return lambda t: rearrange(t[:, prefix:], "b (h w) c -> b c h w", h=gh, w=gw)


def nhwc(t: Tensor) -> Tensor:
    return rearrange(t, "b h w c -> b c h w")


def nchw(t: Tensor) -> Tensor:
    assert t.ndim == 4
    return t


class Family(NamedTuple):
    build: Callable[[], nn.Module]
    size: tuple[int, int]
    layers: tuple[str, ...]  # the cut a user would pick
    layout: str  # for the record: NCHW, NHWC, tokens p=.. gh x gw
    to_map: Callable[[Tensor], Tensor]  # the cut's value -> (B, C, h, w), written from knowledge of the family
    slow: bool = False
    xfail: str | None = None  # set when the library fails on this family (every check of it is expected to fail)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=N_CLASSES, **kw)


def _hf(model_cls: str, config_cls: str, **cfg: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=N_CLASSES, **cfg))


_TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
_HF_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)

FAMILIES: dict[str, Family] = {
    # --- timm transformers with token features (the graph route) ---
    # BEiT: average-pooled (fc_norm after the mean of the patch tokens): the last block's output tokens, CLS first
    "timm_beit": Family(_timm("beit_base_patch16_224", img_size=32, patch_size=8, **_TINY_VIT), (32, 32),
                        ("blocks.1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    # CaiT / XCiT: class attention reads the patch tokens; the cut is norm1 of the last class-attention block,
    # whose input is cat(CLS, patches)
    "timm_cait": Family(_timm("cait_xxs24_224", img_size=32, patch_size=8, depth_token_only=2, **_TINY_VIT),
                        (32, 32), ("blocks_token_only.1.norm1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "timm_xcit": Family(_timm("xcit_nano_12_p8_224", img_size=32, embed_dim=32, depth=2, num_heads=2,
                              cls_attn_layers=2), (32, 32), ("cls_attn_blocks.1.norm1",), "tokens p=1 4x4",
                        tokens(1, 4, 4)),
    # PiT: CLS-pooled, three pooling stages (64 px: 7x7 -> 4x4 -> 2x2 patches); norm1 of the last stage's block
    "timm_pit": Family(_timm("pit_ti_224", img_size=64, base_dims=[8, 8, 8], depth=[1, 1, 1], heads=[2, 2, 2]),
                       (64, 64), ("transformers.2.blocks.0.norm1",), "tokens p=1 2x2", tokens(1, 2, 2)),
    # Twins-SVT: average pooled, final norm of the last stage's tokens (64 px / 32 = 2x2)
    "timm_twins": Family(_timm("twins_svt_small", embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2),
                               depths=(1, 1, 1, 1)), (64, 64), ("norm",), "tokens p=0 2x2", tokens(0, 2, 2)),
    # CrossViT: two branches (patch 12: 4x4, patch 16: 3x3); the last value on a grid is the small-patch branch's
    # tokens inside the last fusion (branch 1's CLS cross-attends to them): cat(projected CLS, 16 patches)
    "timm_crossvit": Family(_timm("crossvit_tiny_240", img_size=48, img_scale=(1.0, 1.0), patch_size=[12, 16],
                                  embed_dim=[16, 32], depth=[[1, 1, 0]], num_heads=[2, 2], mlp_ratio=[2, 2, 1]),
                            (48, 48), ("blocks.0.fusion.1.norm1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    # VOLO: class attention then a head reading CLS and (aux head) every patch token: the final norm
    "timm_volo": Family(lambda: timm.models.volo.VOLO(img_size=32, layers=[1, 1, 1, 1], stem_hidden_dim=8,
                                                      embed_dims=(32, 32, 32, 32), num_heads=(1, 1, 1, 1),
                                                      num_classes=N_CLASSES),
                        (32, 32), ("norm",), "tokens p=1 2x2", tokens(1, 2, 2)),
    # TNT: CLS-pooled; the outer tokens before the last outer attention
    "timm_tnt": Family(_timm("tnt_s_patch16_224", img_size=32, patch_size=8, embed_dim=32, inner_dim=8, depth=2,
                             num_heads_outer=2), (32, 32), ("blocks.1.norm_out",), "tokens p=1 4x4",
                       tokens(1, 4, 4)),
    # ConViT: GPSA block then an MHSA block with the CLS token (embed_dim is per head: 2 x 32 = 64 channels)
    "timm_convit": Family(_timm("convit_tiny", img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2,
                                local_up_to_layer=1), (32, 32), ("blocks.1.norm1",), "tokens p=1 4x4",
                          tokens(1, 4, 4)),
    # LeViT: average-pooled tokens (B, N, C) of the last stage (128 px / 16 / 2 / 2 = 2x2); LeViT's attention
    # biases fix the input size
    "timm_levit": Family(_timm("levit_128s", img_size=128, embed_dim=(16, 32, 48), key_dim=8, num_heads=(2, 2, 2),
                               depth=(1, 1, 1)), (128, 128), ("stages",), "tokens p=0 2x2", tokens(0, 2, 2),
                         slow=True),
    # EfficientFormer: the last stage flattens to tokens for its attention block (fixed 7x7 biases: 224 px)
    "timm_efficientformer": Family(_timm("efficientformer_l1", depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32)),
                                   (224, 224), ("norm",), "tokens p=0 7x7", tokens(0, 7, 7)),
    # MLP-Mixer: token-mixing MLPs over a fixed 4x8 grid, non-square
    "timm_mixer": Family(lambda: timm.models.mlp_mixer.MlpMixer(img_size=(32, 64), patch_size=8, num_blocks=2,
                                                                embed_dim=32, num_classes=N_CLASSES),
                         (32, 64), ("norm",), "tokens p=0 4x8", tokens(0, 4, 8)),
    # EVA02 (rope, swiglu; average-pooled): the last block's tokens, non-square 4x8
    "timm_eva02": Family(_timm("eva02_tiny_patch14_224", img_size=(32, 64), patch_size=8, **_TINY_VIT), (32, 64),
                         ("blocks.1",), "tokens p=1 4x8", tokens(1, 4, 8)),
    # DeiT3 (layer scale, no class pos-embed): timm's ViT route, CLS-pooled: norm1 of the last block, non-square
    "timm_deit3": Family(_timm("deit3_small_patch16_224", img_size=(32, 64), patch_size=8, **_TINY_VIT), (32, 64),
                         ("blocks.1.norm1",), "tokens p=1 4x8", tokens(1, 4, 8)),
    # NaFlexViT (4 register tokens, no CLS, average-pooled): the last block's tokens
    "timm_naflexvit": Family(_timm("naflexvit_base_patch16_gap", img_size=32, patch_size=8, **_TINY_VIT), (32, 32),
                             ("blocks.1",), "tokens p=4 4x4", tokens(4, 4, 4)),
    # --- timm models whose forward_features is a map (timm's own split) ---
    # MambaOut: channels-last stages, forward_features (B, h, w, C); non-square 2x4
    "timm_mambaout": Family(_timm("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), (64, 128),
                            ("forward_features",), "NHWC 2x4", nhwc),
    # SwinV2: post-norm blocks; forward_features is the final norm, channels-last (64 px / 4 / 2 = 8x8)
    "timm_swinv2": Family(_timm("swinv2_tiny_window8_256", img_size=64, window_size=4, embed_dim=16, depths=(1, 1),
                                num_heads=(1, 2)), (64, 64), ("forward_features",), "NHWC 8x8", nhwc),
    # TResNet: space-to-depth stem (the first conv reads 48 channels), NCHW
    "timm_tresnet": Family(_timm("tresnet_m", layers=[1, 1, 1, 1], width_factor=0.25), (64, 64),
                           ("forward_features",), "NCHW 2x2", nchw),
    # --- torchvision, no layer names ---
    "tv_vit": Family(lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                  num_heads=2, hidden_dim=32, mlp_dim=64,
                                                                  num_classes=N_CLASSES),
                     (32, 32), ("encoder.layers.encoder_layer_1.ln_1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "tv_swin": Family(lambda: torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                                                 num_heads=[1, 2], window_size=[4, 4],
                                                                 num_classes=N_CLASSES),
                      (32, 64), ("norm",), "NHWC 4x8", nhwc),
    "tv_maxvit": Family(lambda: torchvision.models.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2,
                                                          block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                                                          stochastic_depth_prob=0.0, num_classes=N_CLASSES),
                        (64, 64), ("blocks.1",), "NCHW 8x8", nchw),
    "tv_resnet18": Family(lambda: torchvision.models.resnet18(num_classes=N_CLASSES), (64, 64), ("layer4",),
                          "NCHW 2x2", nchw),
    "tv_convnext": Family(lambda: torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)],
                                                              num_classes=N_CLASSES),
                          (64, 64), ("features",), "NCHW 8x8", nchw),
    "tv_mobilenet_v3": Family(lambda: torchvision.models.mobilenet_v3_small(num_classes=N_CLASSES), (64, 64),
                              ("features",), "NCHW 2x2", nchw),
    "tv_efficientnet_b0": Family(lambda: torchvision.models.efficientnet_b0(num_classes=N_CLASSES), (64, 64),
                                 ("features",), "NCHW 2x2", nchw, slow=True),
    # --- Hugging Face transformers, tiny random configs ---
    "hf_vit": Family(_hf("ViTForImageClassification", "ViTConfig", **_HF_VIT), (32, 32),
                     ("vit.layers.1.layernorm_before",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "hf_deit": Family(_hf("DeiTForImageClassification", "DeiTConfig", **_HF_VIT), (32, 32),
                      ("deit.layers.1.layernorm_before",), "tokens p=2 4x4", tokens(2, 4, 4)),
    "hf_dinov2": Family(_hf("Dinov2ForImageClassification", "Dinov2Config", hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8),
                        (32, 32), ("dinov2",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "hf_swin": Family(_hf("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                          depths=[1, 1], num_heads=[1, 2], window_size=4), (32, 32),
                      ("swin.layernorm",), "tokens p=0 4x4", tokens(0, 4, 4)),
    "hf_convnext": Family(_hf("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[8, 16],
                              depths=[1, 1]), (64, 64), ("convnext.encoder",), "NCHW 8x8", nchw),
    "hf_resnet": Family(_hf("ResNetForImageClassification", "ResNetConfig", embedding_size=8, hidden_sizes=[8, 16],
                            depths=[1, 1], layer_type="basic"), (64, 64), ("resnet.encoder",), "NCHW 8x8", nchw),
}
TIMM_FEATURES_ROUTE = {"timm_mambaout", "timm_swinv2", "timm_tresnet"}  # forward_features, not a submodule
NOT_GRAPH_ROUTE = TIMM_FEATURES_ROUTE | {"timm_deit3"}  # timm's own splits: no capture, no example=


def make(build: Callable[[], nn.Module], size: tuple[int, int], seed: int = 0) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)
    model = noised(build(), seed).eval().double()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, x


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
            fam = FAMILIES[name]
            model, x = make(fam.build, fam.size)
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


def _params(names) -> list:
    out = []
    for n in names:
        fam = FAMILIES[n]
        marks = ([pytest.mark.slow] if fam.slow else []) + (
            [pytest.mark.xfail(strict=True, reason=fam.xfail)] if fam.xfail else [])
        out.append(pytest.param(n, marks=marks, id=n))
    return out


ALL = _params(FAMILIES)
MODULE_CUTS = _params([n for n in FAMILIES if n not in TIMM_FEATURES_ROUTE])


# ---------------------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------------------

def logits_of(out: Any) -> Tensor:
    """The classifier logits of a model's output (a tensor, or a Hugging Face ModelOutput's ``logits``)."""
    return out if isinstance(out, Tensor) else out.logits


def class_scores(classes: list[int]) -> Callable[[Any], Tensor]:
    return lambda out: logits_of(out)[:, classes]


def hook_oracle(model: nn.Module, x: Tensor, layer: str, to_map: Callable[[Tensor], Tensor],
                score: Callable[[Any], Tensor], create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """The unmodified model with a forward hook on ``layer``: its output and the gradient of each score column at
    it, both turned into (B, C, h, w) by ``to_map``: A (B, C, h, w), G (B, K, C, h, w). With ``create_graph`` both
    stay differentiable w.r.t. the parameters (double backward)."""
    seen: list = []
    handle = model.get_submodule(layer).register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        if create_graph:  # attention written out (AttentionTaps, below): the fused kernel has no double backward
            with AttentionTaps():
                s = score(model(x))
        else:
            s = score(model(x))
    finally:
        handle.remove()
    assert len(seen) == 1, f"{layer} ran {len(seen)} times"
    t = seen[0] if isinstance(seen[0], Tensor) else seen[0][0]  # a Hugging Face encoder's ModelOutput
    grads = [to_map(torch.autograd.grad(s[:, k].sum(), t, retain_graph=True, create_graph=create_graph)[0])
             for k in range(s.shape[1])]
    return to_map(t if create_graph else t.detach()), torch.stack(grads, dim=1)


def features_oracle(model: nn.Module, x: Tensor, to_map: Callable[[Tensor], Tensor],
                    classes: list[int]) -> tuple[Tensor, Tensor]:
    """timm's public contract: ``forward_head(forward_features(x))``; the feature turned into (B, C, h, w) by hand."""
    f = model.forward_features(x).detach().requires_grad_()
    logits = model.forward_head(f)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-12)
    grads = [to_map(torch.autograd.grad(logits[:, c].sum(), f, retain_graph=True)[0]) for c in classes]
    return to_map(f.detach()), torch.stack(grads, dim=1)


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
    assert built.sp.layers == FAMILIES[name].layers
    if name not in TIMM_FEATURES_ROUTE:
        assert built.sp.layers[0] in dict(built.model.named_modules())  # a name the user can look up


@pytest.mark.parametrize("name", ALL)
def test_head_of_extract_is_the_model(zoo, name):
    model, x, sp = zoo[name]
    with torch.no_grad():
        assert_outputs(sp.head(sp.extract(x)), model(x))
    funcam.check_split(sp, x, model, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_maps_equal_loop_oracle(zoo, name):
    model, x, sp = zoo[name]
    a, g = cut_oracle(sp, x, class_scores(CLASSES))
    for method in ("gradcam", "gradcampp", "hirescam"):
        got = funcam.cam(sp, x, CLASSES, method=method, relu=False)
        assert_maps(got.maps, rule(method, g, a[:, None]))
        torch.testing.assert_close(got.logits, logits_of(model(x)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", MODULE_CUTS)
def test_maps_equal_hook_oracle(zoo, name):
    """The cut module's output and gradient from the unmodified model, its layout written by hand."""
    model, x, sp = zoo[name]
    fam = FAMILIES[name]
    a, g = hook_oracle(model, x, fam.layers[0], fam.to_map, class_scores(CLASSES))
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


@pytest.mark.parametrize("name", _params(sorted(TIMM_FEATURES_ROUTE)))
def test_maps_equal_forward_features_oracle(zoo, name):
    """timm's feature-map route (NCHW, and NHWC for MambaOut and SwinV2) against forward_features/forward_head."""
    model, x, sp = zoo[name]
    a, g = features_oracle(model, x, FAMILIES[name].to_map, CLASSES)
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


def test_grids_follow_non_square_inputs(zoo):
    """The map's grid follows the input's (h, w), not (w, h), for token and channels-last features."""
    for name, grid in [("timm_mixer", (4, 8)), ("timm_deit3", (4, 8)), ("timm_eva02", (4, 8)),
                       ("timm_mambaout", (2, 4)), ("tv_swin", (4, 8))]:
        _, x, sp = zoo[name]
        assert x.shape[-2] < x.shape[-1]
        assert tuple(funcam.gradcam(sp, x, [1]).shape) == (2, 1) + grid, name


def test_hf_swin_named_cut(zoo):
    """With layer= the Hugging Face Swin gives the same cut as its default."""
    fam = FAMILIES["hf_swin"]
    model, x = make(fam.build, fam.size)
    sp = funcam.split(model, "swin.layernorm", example=x)
    assert sp.layers == ("swin.layernorm",)
    assert_outputs(sp.head(sp.extract(x)), model(x))
    a, g = hook_oracle(model, x, "swin.layernorm", fam.to_map, class_scores(CLASSES))
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


def test_hiera_is_refused():
    """Hiera unrolls its positions into mask units: no cut on the input's grid can be found, and split says so."""
    model, x = make(_timm("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), (64, 64))
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
    fam = FAMILIES[name]
    model, x = make(fam.build, fam.size)
    sp = funcam.split(model, layer, example=x)
    assert sp.layers == (layer,)
    assert_outputs(sp.head(sp.extract(x)), model(x))
    a, g = hook_oracle(model, x, layer, to_map, class_scores(CLASSES))
    assert_maps(funcam.gradcam(sp, x, CLASSES, relu=False), rule("gradcam", g, a[:, None]))


def test_named_cut_after_the_last_attention_of_a_cls_model_is_refused():
    """After the last attention of a CLS-pooled ViT only the CLS token reaches the logits: every map would be zero,
    and split says so instead of returning zeros."""
    fam = FAMILIES["tv_vit"]
    model, x = make(fam.build, fam.size)
    with pytest.raises(ValueError, match=r"'encoder.layers.encoder_layer_1.ln_2' is exactly zero.*cut before it"):
        funcam.split(model, "encoder.layers.encoder_layer_1.ln_2", example=x)


def test_chained_named_cuts_hf_vit():
    """Two cuts on one path (multi-layer CAM): the earlier map's gradient is the total derivative, as a hook sees it."""
    fam = FAMILIES["hf_vit"]
    model, x = make(fam.build, fam.size)
    names = ["vit.layers.0.layernorm_before", "vit.layers.1.layernorm_before"]
    sp = funcam.split(model, names, example=x)
    assert sp.layers == tuple(names)
    maps = funcam.gradcam(sp, x, CLASSES, relu=False)
    seen: dict = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
               for n in names]
    try:
        s = logits_of(model(x))[:, CLASSES]
    finally:
        for h in handles:
            h.remove()
    to_map = tokens(1, 4, 4)
    for got, n in zip(maps, names, strict=True):
        g = torch.stack([to_map(torch.autograd.grad(s[:, k].sum(), seen[n], retain_graph=True)[0])
                         for k in range(len(CLASSES))], dim=1)
        assert_maps(got, rule("gradcam", g, to_map(seen[n].detach())[:, None]))


def test_swinv2_at_timm_init_weights_is_not_cut_as_swin_v1():
    build = FAMILIES["timm_swinv2"].build
    torch.manual_seed(0)
    model = build().eval().double()  # timm's own initialisation: res-post-norm weights are 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sp = funcam.split(model)
    noised(model)  # weights loaded or trained after the split was made: the split reads them at every call
    with torch.no_grad():
        assert_outputs(sp.head(sp.extract(x)), model(x))
    a, g = features_oracle(model, x, nhwc, CLASSES)
    assert_maps(funcam.gradcam(sp, x, CLASSES, relu=False), rule("gradcam", g, a[:, None]))


def test_zero_weights_after_the_cut_are_named_on_every_route():
    """A zeroed classifier: no input reaches the cut. The graph route's first-use check refuses the split (a structural
    zero for these weights); the timm route has no capture to check, so the call warns and returns the zero maps. Both
    name the all-zero weight tensor."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=N_CLASSES).eval()
    with torch.no_grad():
        tv.fc.weight.zero_()
    with pytest.raises(ValueError, match=r"no default cut for ResNet: .*reached by the gradient.*\(fc\.weight\)"):
        funcam.split(tv, example=x)
    torch.manual_seed(0)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=N_CLASSES).eval()
    with torch.no_grad():
        tm.fc.weight.zero_()
    with pytest.warns(funcam.ZeroMapWarning, match=r"exactly zero on this input.*all zero \(fc\.weight"):
        maps = funcam.gradcam(funcam.split(tm), x, [0, 1])
    assert maps.shape == (2, 2, 2, 2) and not bool(maps.any())


def test_channels_last_feature_with_as_many_channels_as_positions():
    model, x = make(_timm("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)), (256, 256))
    sp = funcam.split(model)
    assert sp.layers == ("forward_features",)
    try:
        maps = funcam.gradcam(sp, x, CLASSES, relu=False)
    except ValueError as e:  # a refusal is acceptable if it says what is ambiguous, not where the split was built
        assert "compile" not in str(e), str(e)
    else:
        a, g = features_oracle(model, x, nhwc, CLASSES)
        assert_maps(maps, rule("gradcam", g, a[:, None]))


@pytest.mark.parametrize("name,size2", [("tv_resnet18", (96, 64)), ("tv_swin", (64, 32)),
                                        pytest.param("timm_twins", (64, 96), marks=pytest.mark.slow)])
def test_second_input_size_is_captured_and_correct(zoo, name, size2):
    """A graph-route split meets a new input size: captured again for it, same cut, maps equal the hook oracle."""
    model, _, sp = zoo[name]
    x2 = torch.randn(2, 3, *size2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fam = FAMILIES[name]
    to_map = tokens(0, size2[0] // 32, size2[1] // 32) if name == "timm_twins" else fam.to_map
    a, g = hook_oracle(model, x2, fam.layers[0], to_map, class_scores(CLASSES))
    for method in ("gradcam", "hirescam"):
        assert_maps(funcam.cam(sp, x2, CLASSES, method=method, relu=False).maps, rule(method, g, a[:, None]))


@pytest.mark.parametrize("name,param", [("tv_resnet18", "layer4.1.conv2.weight"),
                                        ("hf_vit", "vit.layers.1.attention.q_proj.weight"),
                                        ("timm_beit", "blocks.0.mlp.fc1.weight")])
def test_maps_are_differentiable(zoo, name, param):
    """d(sum of Grad-CAM maps)/d(parameter) equals the double backward of the hook oracle."""
    model, x, sp = zoo[name]
    fam = FAMILIES[name]
    w = model.get_parameter(param)
    a, g = hook_oracle(model, x, fam.layers[0], fam.to_map, class_scores([1, 3]), create_graph=True)
    (want,) = torch.autograd.grad(rule("gradcam", g, a[:, None]).sum(), w)
    (got,) = torch.autograd.grad(funcam.gradcam(sp, x, [1, 3], relu=False).sum(), w)
    assert_maps(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs that are not logits: segmentation (a dict) and embeddings, with score callables
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmentation():
    model, x = make(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3), (64, 64))
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

    a, g = cut_oracle(sp, x, score)
    for method in ("gradcam", "gradcampp", "hirescam"):
        got = funcam.cam(sp, x, score, method=method, relu=False)
        assert_maps(got.maps, rule(method, g, a[:, None]))
        assert got.classes is None and isinstance(got.logits, dict)


@pytest.mark.slow
def test_deeplabv3_score_callable_equals_hook_oracle():
    """torchvision DeepLabV3: cut before the final 1x1 classifier conv; "class c inside the mask" as scores."""
    model, x = make(lambda: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3), (64, 64))
    sp = funcam.split(model, example=x)
    assert sp.layers == ("classifier.3",)
    mask = torch.zeros(64, 64, dtype=torch.float64)
    mask[20:60, 4:30] = 1

    def score(out):
        return (out["out"][:, [1, 2]] * mask).sum(dim=(2, 3)) / mask.sum()

    a, g = hook_oracle(model, x, "classifier.3", nchw, score)
    for method in ("gradcam", "gradcampp", "hirescam"):
        assert_maps(funcam.cam(sp, x, score, method=method, relu=False).maps, rule(method, g, a[:, None]))


def _embedder(route: str) -> nn.Module:
    if route == "timm_features":
        return timm.create_model("resnet18", pretrained=False, num_classes=0)  # (B, 512) pooled features
    m = torchvision.models.resnet18()
    m.fc = nn.Identity()
    return m


REFS = torch.randn(4, 512, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def similarity(emb: Tensor) -> Tensor:
    """(B, D) embeddings -> (B, 4) cosine similarities to the reference embeddings (CLIP-style prompts as classes)."""
    return F.normalize(emb, dim=1) @ F.normalize(REFS, dim=1).T


@pytest.mark.parametrize("route", ["timm_features", "graph"])
def test_embedding_similarity_equals_loop_oracle(route):
    """An embedding model (B, D) explained for its similarity to K reference embeddings."""
    model, x = make(lambda: _embedder(route), (64, 64))
    if route == "timm_features":
        sp = funcam.split(model)
        assert sp.layers == ("forward_features",) and sp.pooled is not None  # the average-pool fast path
    else:
        sp = funcam.split(model, "layer4", example=x)  # the default cut (test_embedding_default_cut_is_the_last_stage)
    a, g = cut_oracle(sp, x, similarity)
    for method in ("gradcam", "gradcampp", "hirescam"):
        got = funcam.cam(sp, x, similarity, method=method, relu=False)
        assert_maps(got.maps, rule(method, g, a[:, None]))
        assert got.classes is None
    ha, hg = hook_oracle(model, x, "layer4", nchw, similarity)  # both routes name it layer4
    assert_maps(funcam.gradcam(sp, x, similarity, relu=False), rule("gradcam", hg, ha[:, None]))


def test_embedding_default_cut_is_the_last_stage():
    model, x = make(lambda: _embedder("graph"), (64, 64))
    sp = funcam.split(model, example=x)
    assert sp.layers == ("layer4",)
    a, g = hook_oracle(model, x, "layer4", nchw, similarity)
    assert_maps(funcam.gradcam(sp, x, similarity, relu=False), rule("gradcam", g, a[:, None]))


# ---------------------------------------------------------------------------------------------------------------------
# Attention relevance for any transformer, against the model's own forward with explicit, tapped attention
# ---------------------------------------------------------------------------------------------------------------------

class AttentionTaps(TorchFunctionMode):
    """Runs the model's own forward with each attention computed explicitly (Vaswani et al. 2017, eq. 1) and records
    its probabilities (B, heads, N, N), optionally plus a zero-valued tap ``deltas[i]`` whose gradient is the gradient
    at the probabilities. Intercepts ``F.scaled_dot_product_attention`` (timm, Hugging Face sdpa),
    ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: torchvision) and explicit softmaxes over N x N.
    Inside the handler the mode is off, so the explicit ops are not intercepted again."""

    def __init__(self, deltas: list[Tensor] | None = None):
        super().__init__()
        self.deltas, self.probs = deltas, []

    def _tap(self, p: Tensor) -> Tensor:
        if self.deltas is not None:
            p = p + self.deltas[len(self.probs)]
        self.probs.append(p)
        return p

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            assert not kwargs.get("is_causal") and not kwargs.get("dropout_p")
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            s = q @ k.transpose(-2, -1) * scale
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
            return self._tap(s.softmax(dim=-1)) @ v
        if func is F.multi_head_attention_forward:
            query, key, value, _, heads, w_in, b_in = args[:7]
            w_out, b_out = args[11], args[12]
            assert query is key is value and args[7] is None and not kwargs.get("attn_mask")
            qkv = F.linear(query, w_in, b_in)  # (L, B, 3E)
            q, k, v = (rearrange(t, "l b (h d) -> b h l d", h=heads) for t in qkv.chunk(3, dim=-1))
            p = self._tap((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))
            return F.linear(rearrange(p @ v, "b h l d -> l b (h d)"), w_out, b_out), None
        if func in (F.softmax, torch.softmax, Tensor.softmax):
            t = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if t.ndim == 4 and t.shape[-1] == t.shape[-2] and dim in (-1, 3):
                return self._tap(torch.softmax(t, dim=-1))  # in t's dtype (Hugging Face eager asks float32)
        return func(*args, **kwargs)


def attention_oracle(model: nn.Module, x: Tensor, classes: list[int]) -> tuple[list[Tensor], list[list[Tensor]]]:
    """(probabilities per layer (B, heads, N, N), per class: the gradient of that logit at each layer's probs)."""
    with torch.no_grad(), AttentionTaps() as rec:
        model(x)
    probs = [p.detach() for p in rec.probs]
    deltas = [torch.zeros_like(p, requires_grad=True) for p in probs]
    with AttentionTaps(deltas) as taps:
        logits = logits_of(model(x))
    assert len(taps.probs) == len(probs)
    grads = [list(torch.autograd.grad(logits[:, c].sum(), deltas, retain_graph=True)) for c in classes]
    return probs, grads


def mix(a: Tensor) -> Tensor:
    """(A + I) / 2, rows normalised (Abnar & Zuidema 2020)."""
    m = (a + torch.eye(a.shape[-1], dtype=a.dtype)) / 2
    return m / m.sum(dim=-1, keepdim=True)


def rolled(mats: list[Tensor], readout: Tensor, prefix: int, grid: tuple[int, int], chefer: bool = False) -> Tensor:
    """The readout row of R at the patch columns: (B, gh, gw). R = M_L ... M_1 (rollout: the first block applied
    first), or Chefer et al.'s R = I, R <- R + Abar_l R in forward order."""
    n = mats[0].shape[-1]
    r = torch.eye(n, dtype=mats[0].dtype).expand_as(mats[0])
    for m in mats:
        r = r + m @ r if chefer else m @ r
    row = readout @ r  # (B, N)
    return rearrange(row[:, prefix:], "b (h w) -> b h w", h=grid[0], w=grid[1])


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
            cache[name] = attention_oracle(model, x, CLASSES)
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
    want = rolled([mix(p.mean(dim=1)) for p in probs], readout, prefix, grid)
    assert_maps(funcam.attention_rollout(sp, x)[:, 0], want)
    if name == "hf_vit":
        assert_maps(funcam.attention_rollout(model, x)[:, 0], want)  # the model itself: captured again, same maps


@pytest.mark.parametrize("name", _ROLLOUT_PARAMS)
def test_grad_rollout_and_chefer_equal_loop_oracle(zoo, oracle_attn, name):
    _, x, sp = zoo[name]
    probs, grads = oracle_attn(name)
    kind, prefix, grid = ROLLOUT[name]
    readout = _readout(kind, probs[0].shape[-1], prefix)
    gr = torch.stack([rolled([mix((g * a).mean(dim=1).clamp(min=0)) for g, a in zip(gs, probs)],
                             readout, prefix, grid) for gs in grads], dim=1)
    ch = torch.stack([rolled([(g * a).clamp(min=0).mean(dim=1) for g, a in zip(gs, probs)],
                             readout, prefix, grid, chefer=True) for gs in grads], dim=1)
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
    return make(_hf("SwinForImageClassification", "SwinConfig", image_size=size, patch_size=4, embed_dim=16,
                    depths=[1, 1], num_heads=[1, 2], window_size=4), (size, size))


@pytest.mark.slow
def test_rollout_refuses_hf_swin_windows():
    """64 px: both stages attend in 4x4 windows (4 windows in the last stage): no global attention, a clear error."""
    model, x = _hf_swin(64)
    with pytest.raises(ValueError, match="SwinForImageClassification also attends within windows"):
        funcam.attention_rollout(model, x)


def test_relevance_hf_swin_one_window_last_stage_is_not_a_crash():
    """32 px: stage 0 attends in four 4x4 windows, stage 1's 4x4 grid is one window. Relevance must be computed or
    refused with a clear ValueError, never a RuntimeError from the kernel."""
    model, x = _hf_swin(32)
    for fn in (funcam.grad_rollout, funcam.chefer_relevance):
        try:
            fn(model, x, [0, 1])
        except ValueError:
            pass


@pytest.mark.slow
def test_grad_rollout_cait_no_warning(zoo):
    _, x, sp = zoo["timm_cait"]
    maps = funcam.grad_rollout(sp, x, CLASSES)  # pytest turns the UserWarning into an error
    assert torch.count_nonzero(maps) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Promises: compiled equals eager without recompiles; the model untouched
# ---------------------------------------------------------------------------------------------------------------------

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
    fam = FAMILIES["tv_resnet18"]
    model, x = make(fam.build, fam.size)
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
    fam = FAMILIES[name]
    model, x = make(fam.build, fam.size)
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
