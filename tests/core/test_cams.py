"""Oracle tests: funcam's maps against references computed another way, compared as numbers.

* The slow loop oracle (tests/_oracle.py: hooked_loop, rule): for each image b, one plain forward of the *model* (not of
  funcam's split), ``torch.autograd.grad(score_k, feature)`` for each class k separately, and each
  method's formula by hand on that image's ``(C, h, w)`` tensors. The feature is taken without funcam:
  ``model.forward_features`` for timm CNNs; a forward hook on the last block's ``norm1``/``norm2`` for
  ViT/DeiT/register ViTs/Swin (tokens turned into a grid here, prefix tokens dropped); forward hooks
  on the cut modules for FX cuts. These run in float64 (tight tolerances, also well-conditioned for
  XGrad-CAM and Grad-CAM++ whose denominators can be near zero on LayerNorm features) and in float32.
* pytorch-grad-cam (full normalised, resized output and raw pre-ReLU maps), captum's LayerGradCam,
  the closed form of Grad-CAM for a global-average-pool + linear head, and properties of the API.
* test_fx_cut_before_inplace_op: an FX cut whose output the model next modifies in place (a conv followed
  by ReLU(inplace=True)) explains the pre-ReLU conv output, as the loop oracle does.

Tolerances (``scale`` is the largest |value| of the reference map of that image and class, never 0):
    float64 loop oracle: |funcam - oracle| <= 1e-10 * scale (observed <= 5e-13)
    float32 loop oracle: |funcam - oracle| <= 2e-5 * scale (observed <= 2e-6), 1e-3 for xgradcam
        (observed 6e-5 on DeiT: its denominator sum_hw A nearly cancels on LayerNorm features)
    (argmax_channel's scale is the feature's max |value|: the picked channel may be an all-zero one)
    pytorch-grad-cam, captum (float32, numpy vs torch): 1e-5 * scale for raw maps, 1e-5 absolute for
        [0, 1] normalised maps
    properties (float32, same computation batched differently): 1e-5 * scale
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

import funcam
from tests._oracle import hooked_forward, hooked_loop, nhwc, rule, timm_features, tokens
from tests.conftest import timm_model, tv_model

B, K, N_CLASSES = 2, 3, 10
# per-image classes (B, K): different classes per image, one shared (7) in different positions
CLASSES = torch.tensor([[1, 4, 7], [7, 0, 9]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread is as fast on an idle machine and avoids OpenMP's
    stalls (10-50x slower) when other processes hold the cores. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------
# The loop oracle
# ---------------------------------------------------------------------------------------------------

def class_scores(classes: Tensor) -> Callable[[int, Tensor], Tensor]:
    return lambda b, logits: logits[0, classes[b]]


# feature extractors for the oracle (no funcam code): tests/_oracle.py's timm_features and hooked_forward

def cnn_to_map(f, xb):
    return f[0]


def norm_hook_feature(part: str):
    def feature(model, xb):
        blk = model.blocks[-1] if hasattr(model, "blocks") else model.layers[-1].blocks[-1]
        return hooked_forward(model, [getattr(blk, part)], xb)
    return feature


def vit_to_map(model):
    p = model.patch_embed.patch_size

    def to_map(t, xb):  # (1, N, C): prefix tokens then h*w patch tokens in row-major order
        gh, gw = xb.shape[2] // p[0], xb.shape[3] // p[1]
        return tokens(t.shape[1] - gh * gw, gh, gw)(t)[0]
    return to_map


def swin_to_map(t, xb):
    if t.ndim == 4:  # norm1 output (1, h, w, C)
        return nhwc(t)[0]
    return tokens(0, xb.shape[2] // 32, xb.shape[3] // 32)(t)[0]  # norm2 output (1, h*w, C)


# ---------------------------------------------------------------------------------------------------
# Model families
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    id: str
    name: str
    size: tuple[int, int]
    kind: str = "cnn"  # cnn | vit | swin
    kwargs: tuple = ()
    token_cut: str | None = None  # passed to funcam.split
    cut: str | None = None  # the block part the oracle hooks (funcam's expected default when token_cut is None)
    prefix: int = 0  # prefix tokens (CLS, distillation, registers)


SPECS = [
    Spec("resnet18", "resnet18", (96, 128)),
    Spec("convnext_atto", "convnext_atto", (96, 128)),
    Spec("efficientnet_b0", "efficientnet_b0", (96, 128)),
    Spec("tf_efficientnet_lite0", "tf_efficientnet_lite0", (96, 128)),
    # vgg11's ConvMlp head narrowed (4096 -> 256 hidden) so its 7x7 conv is not 100M parameters
    Spec("vgg11", "vgg11", (96, 128), kwargs=(("mlp_ratio", 1 / 16),)),
    Spec("regnetx_002", "regnetx_002", (96, 128)),
    Spec("mobilenetv3_small_050", "mobilenetv3_small_050", (96, 128)),
    Spec("densenet121", "densenet121", (96, 128)),
    # ViTs at a non-square grid (3 x 5) so a transposed rearrange cannot pass
    Spec("vit_token", "vit_tiny_patch16_224", (48, 80), "vit", (("img_size", (48, 80)),), cut="norm1", prefix=1),
    Spec("vit_avg", "vit_tiny_patch16_224", (48, 80), "vit",
         (("img_size", (48, 80)), ("global_pool", "avg")), cut="norm2", prefix=1),
    Spec("vit_avg_norm1", "vit_tiny_patch16_224", (48, 80), "vit",
         (("img_size", (48, 80)), ("global_pool", "avg")), token_cut="norm1", cut="norm1", prefix=1),
    Spec("deit_distilled", "deit_tiny_distilled_patch16_224", (48, 80), "vit",
         (("img_size", (48, 80)),), cut="norm1", prefix=2),
    Spec("vit_reg4_dinov2", "vit_small_patch14_reg4_dinov2", (42, 70), "vit",
         (("img_size", (42, 70)),), cut="norm1", prefix=5),
    Spec("vit_reg4_gap", "vit_little_patch16_reg4_gap_256", (48, 80), "vit",
         (("img_size", (48, 80)),), cut="norm2", prefix=4),
    Spec("swin", "swin_tiny_patch4_window7_224", (128, 160), "swin",
         (("img_size", (128, 160)),), cut="norm2"),
    Spec("swin_norm1", "swin_tiny_patch4_window7_224", (128, 160), "swin",
         (("img_size", (128, 160)),), token_cut="norm1", cut="norm1"),
]


@dataclass
class Family:
    spec: Spec
    model: dict  # dtype -> model
    x: dict  # dtype -> input
    _oracle: dict

    def split(self, dtype):
        return funcam.split(self.model[dtype], token_cut=self.spec.token_cut)

    def feature_fn(self):
        return timm_features if self.spec.kind == "cnn" else norm_hook_feature(self.spec.cut)

    def to_map_fn(self):
        if self.spec.kind == "cnn":
            return cnn_to_map
        return vit_to_map(self.model[torch.float32]) if self.spec.kind == "vit" else swin_to_map

    def oracle(self, dtype, classes=CLASSES):
        key = (dtype, tuple(classes.flatten().tolist()))
        if key not in self._oracle:
            a, g = hooked_loop(self.model[dtype], self.x[dtype], class_scores(classes), self.feature_fn(),
                               self.to_map_fn())
            self._oracle[key] = ([ab[0] for ab in a], [[gk[0] for gk in gb] for gb in g])
        return self._oracle[key]


def build(spec: Spec) -> Family:
    m32 = timm_model(spec.name, num_classes=N_CLASSES, **dict(spec.kwargs))
    m64 = copy.deepcopy(m32).double()
    x32 = torch.randn(B, 3, *spec.size, generator=torch.Generator().manual_seed(1))
    return Family(spec, {torch.float32: m32, torch.float64: m64},
                  {torch.float32: x32, torch.float64: x32.double()}, {})


@pytest.fixture(scope="module", params=SPECS, ids=[s.id for s in SPECS])
def family(request) -> Family:
    return build(request.param)


def assert_scaled_close(got: Tensor, ref: Tensor, scale: float, rel: float, what: str) -> None:
    err = (got.detach().to(ref.dtype) - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} * scale {scale:.3g}"


def check_loop_oracle(family: Family, dtype, methods, relu: bool, rel) -> None:
    a, g = family.oracle(dtype)
    sp = family.split(dtype)
    for method in methods:
        out = funcam.cam(sp, family.x[dtype], CLASSES, method=method, relu=relu)
        assert out.maps.dtype == dtype
        assert out.maps.shape == (B, K) + tuple(a[0].shape[1:])
        assert torch.equal(out.classes, CLASSES)
        assert bool(out.maps.detach().abs().amax() > 0), "all maps are zero"
        for b in range(B):
            for k in range(K):
                ref = rule(method, g[b][k], a[b])
                scale = ref.abs().max().item()
                if method == "argmax_channel":
                    # a copy of one channel, which may be a dead (all-zero) ReLU channel: any other
                    # channel would differ at the scale of the features
                    scale = a[b].abs().max().item()
                assert scale > 0, f"oracle map b={b} k={k} is all zero: a vacuous comparison"
                if relu:
                    ref = ref.clamp_min(0)
                tol = rel(method) if callable(rel) else rel
                assert_scaled_close(out.maps[b, k], ref, scale, tol,
                                    f"{family.spec.id} {dtype} {method} relu={relu} b={b} k={k}")


@pytest.mark.parametrize("relu", [False, pytest.param(True, marks=pytest.mark.slow)])  # the ReLU: f32 tests, fast
def test_loop_oracle_all_methods_f64(family: Family, relu) -> None:
    """funcam (one forward, vmapped vjp over classes) == per-image, per-class autograd + the formula,
    for every method, in float64 (observed errors <= 5e-13 * scale)."""
    check_loop_oracle(family, torch.float64, funcam.METHODS, relu=relu, rel=1e-10)


# XGrad-CAM divides by sum_hw A, which can nearly cancel on LayerNorm features (observed 6e-5 on DeiT)
FLOAT32_REL = {"xgradcam": 1e-3}


def test_loop_oracle_all_methods_f32(family: Family) -> None:
    """The same in float32 against a float32 oracle (observed errors <= 2e-6 * scale but XGrad-CAM)."""
    check_loop_oracle(family, torch.float32, funcam.METHODS, relu=False, rel=lambda m: FLOAT32_REL.get(m, 2e-5))


def test_loop_oracle_relu_f32(family: Family) -> None:
    check_loop_oracle(family, torch.float32, ["gradcam", "layercam"], relu=True, rel=2e-5)


def test_split_matches_model(family: Family) -> None:
    """head(extract(x)) == model(x), and the split's feature is the oracle's feature (same cut, same grid)."""
    dtype = torch.float64
    model, x = family.model[dtype], family.x[dtype]
    sp = family.split(dtype)
    feats, _ = funcam._src.core.engine.as_features(sp.extract(x))
    with torch.no_grad():
        ref = model(x)
        logits = sp.head(sp.extract(x))
    torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
    a, _ = family.oracle(dtype)
    fmap = feats.maps[0].detach()
    for b in range(B):
        torch.testing.assert_close(fmap[b], a[b], rtol=1e-12, atol=1e-12)
    if family.spec.kind == "vit":
        assert int(family.model[dtype].num_prefix_tokens) == family.spec.prefix


def test_loop_oracle_softmax_callable(family: Family) -> None:
    """classes=callable: each returned score is explained, against autograd of the same score per image."""
    dtype = torch.float64
    cols = [2, 5]
    score_fn = lambda logits: logits.softmax(-1)[:, cols]  # noqa: E731
    a, g = hooked_loop(family.model[dtype], family.x[dtype], lambda b, logits: score_fn(logits)[0],
                       family.feature_fn(), family.to_map_fn())
    for method in ("gradcam", "hirescam", "layercam"):
        out = funcam.cam(family.split(dtype), family.x[dtype], score_fn, method=method, relu=False)
        assert out.classes is None
        assert out.maps.shape[:2] == (B, len(cols))
        for b in range(B):
            for k in range(len(cols)):
                ref = rule(method, g[b][k][0], a[b][0])
                scale = ref.abs().max().item()
                assert scale > 0
                assert_scaled_close(out.maps[b, k], ref, scale, 1e-10, f"{family.spec.id} softmax {method} b={b} k={k}")


# ---------------------------------------------------------------------------------------------------
# FX cuts and multi-layer splits against the hook oracle
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    return tv_model("resnet18", num_classes=N_CLASSES)


@pytest.mark.slow  # the FX multilayer twin of the graph multilayer oracle
def test_loop_oracle_fx_multilayer(tv_resnet18) -> None:
    """split(model, ["layer3", "layer4"]): the layer3 gradient is the total derivative through layer4."""
    model = copy.deepcopy(tv_resnet18).double()
    x = torch.randn(B, 3, 96, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    feature = lambda m, xb: hooked_forward(m, [m.layer3, m.layer4], xb)  # noqa: E731
    a, g = hooked_loop(model, x, class_scores(CLASSES), feature, cnn_to_map)
    sp = funcam.split(model, ["layer4", "layer3"])  # given out of order: maps come in graph order
    for method in funcam.METHODS:
        out = funcam.cam(sp, x, CLASSES, method=method, relu=False)
        assert isinstance(out.maps, tuple) and len(out.maps) == 2
        assert out.maps[0].shape == (B, K, 6, 8) and out.maps[1].shape == (B, K, 3, 4)
        for layer in range(2):
            for b in range(B):
                for k in range(K):
                    ref = rule(method, g[b][k][layer], a[b][layer])
                    scale = ref.abs().max().item()
                    if method == "argmax_channel":
                        scale = a[b][layer].abs().max().item()
                    assert scale > 0
                    assert_scaled_close(out.maps[layer][b, k], ref, scale, 1e-10,
                                        f"{method} layer {layer} b={b} k={k}")
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x), rtol=1e-12, atol=1e-12)
    # single-layer cuts give the same maps as the multi-layer one
    multi = funcam.cam(sp, x, CLASSES, method="gradcam", relu=False).maps
    for layer, name in enumerate(["layer3", "layer4"]):
        single = funcam.cam(funcam.split(model, name), x, CLASSES, method="gradcam", relu=False).maps
        torch.testing.assert_close(single, multi[layer], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# pytorch-grad-cam
# ---------------------------------------------------------------------------------------------------

def _pgc_classes():
    from pytorch_grad_cam import GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    return {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "hirescam": HiResCAM, "layercam": LayerCAM,
            "xgradcam": XGradCAM, "elementwise": GradCAMElementWise}


PGC_METHODS = ["gradcam", "gradcampp", "hirescam", "layercam", "xgradcam", "elementwise"]


def pgc_run(method, model, target_layers, x, classes):
    """pytorch-grad-cam once per class column k, with per-image targets. Returns the full outputs
    (B, K, H, W) and the raw pre-ReLU maps per layer [(B, K, h, w)] via get_cam_image."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    full, raw = [], [[] for _ in target_layers]
    with _pgc_classes()[method](model=model, target_layers=target_layers) as cam:
        for k in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
            full.append(cam(input_tensor=x, targets=targets))
            acts, grads = cam.activations_and_grads.activations, cam.activations_and_grads.gradients
            for i, layer in enumerate(target_layers):
                raw[i].append(cam.get_cam_image(x, layer, targets, acts[i].numpy(), grads[i].numpy(), False))
    return (torch.from_numpy(np.stack(full, 1)),
            [torch.from_numpy(np.stack(r, 1).astype(np.float32)) for r in raw])


def pgc_equivalent(maps, size):
    """pytorch-grad-cam's output from funcam's ReLU maps: min-max per layer at feature resolution,
    bilinear resize, mean over layers, min-max again."""
    maps = list(maps) if isinstance(maps, tuple) else [maps]
    return funcam.normalize(funcam.fuse(maps, size=size, normalize_each=True))


def check_vs_pgc(method, model, target_layers, sp, x, classes):
    size = tuple(x.shape[2:])
    full, raw = pgc_run(method, model, target_layers, x, classes)
    ours_raw = funcam.cam(sp, x, classes, method=method, relu=False).maps
    ours_raw = list(ours_raw) if isinstance(ours_raw, tuple) else [ours_raw]
    ours_relu = funcam.cam(sp, x, classes, method=method).maps
    ours_full = pgc_equivalent(ours_relu, size).detach()
    assert full.shape == ours_full.shape == (x.shape[0], classes.shape[1]) + size
    # (b) raw pre-ReLU maps at feature resolution
    for r, o in zip(raw, ours_raw):
        assert r.shape == o.shape
        for b in range(x.shape[0]):
            for k in range(classes.shape[1]):
                scale = r[b, k].abs().max().item()
                assert scale > 0
                assert_scaled_close(o[b, k], r[b, k], scale, 1e-5, f"raw {method} b={b} k={k}")
    # (a) full output: most maps must have some positive part, else the comparison is vacuous
    nonflat = (full.flatten(2).amax(-1) > 0.5).float().mean().item()
    assert nonflat >= 0.5, f"only {nonflat:.0%} of the pytorch-grad-cam maps are non-zero"
    err = (ours_full - full).abs().max().item()
    assert err <= 1e-5, f"full {method}: max abs error {err:.3g}"


@pytest.mark.parametrize("method", PGC_METHODS)
def test_pgc_torchvision_resnet18_layer4(tv_resnet18, method) -> None:
    model = tv_resnet18
    x = torch.randn(B, 3, 96, 128, generator=torch.Generator().manual_seed(3))  # non-square: W/H order
    check_vs_pgc(method, model, [model.layer4[-1]], funcam.split(model, "layer4"), x, CLASSES)


@pytest.mark.parametrize("method", ["gradcam", "layercam"] + [pytest.param(m, marks=pytest.mark.slow)
                                                              for m in ("gradcampp", "xgradcam")])
def test_pgc_torchvision_resnet18_multilayer(tv_resnet18, method) -> None:
    """pytorch-grad-cam with target_layers=[layer3, layer4] == normalize(fuse(maps, normalize_each=True))."""
    model = tv_resnet18
    x = torch.randn(B, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    check_vs_pgc(method, model, [model.layer3, model.layer4], funcam.split(model, ["layer3", "layer4"]), x,
                 CLASSES)


@pytest.fixture(scope="module")
def timm_pair():
    resnet = timm_model("resnet18", num_classes=N_CLASSES)
    return {"resnet18": resnet, "convnext_atto": timm_model("convnext_atto", num_classes=N_CLASSES, seed=None)}


@pytest.mark.parametrize("method", PGC_METHODS)
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_pgc_timm_default_split(timm_pair, name, method) -> None:
    """timm CNNs: funcam.split(model)'s feature is the last stage's output, which pytorch-grad-cam hooks."""
    model = timm_pair[name]
    layer = model.layer4 if name == "resnet18" else model.stages[-1]
    x = torch.randn(B, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    sp = funcam.split(model)
    with torch.no_grad():
        _, (stage_out,) = hooked_forward(model, [layer], x)
        assert torch.equal(sp.extract(x), stage_out)
    check_vs_pgc(method, model, [layer], sp, x, CLASSES)


class MiniVGG(nn.Module):
    """VGG-style: torchvision's make_layers (in-place ReLUs) + average pool + linear."""

    def __init__(self):
        super().__init__()
        self.features = torchvision.models.vgg.make_layers([16, "M", 32, "M", 64, 64], batch_norm=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, N_CLASSES)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def mini_vgg() -> nn.Module:
    torch.manual_seed(0)
    return MiniVGG().eval()


@pytest.mark.parametrize("method", PGC_METHODS)
def test_pgc_vgg_inplace_relu(mini_vgg, method) -> None:
    """Cut at features.9, an in-place ReLU (its output is the conv output tensor, modified in place)."""
    model = mini_vgg
    x = torch.randn(B, 3, 24, 40, generator=torch.Generator().manual_seed(6))
    check_vs_pgc(method, model, [model.features[9]], funcam.split(model, "features.9"), x, CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_pgc_torchvision_vgg11(method) -> None:
    """The real torchvision vgg11 (a 100M-parameter classifier, hence slow) at its last in-place ReLU."""
    model = tv_model("vgg11", num_classes=N_CLASSES)
    x = torch.randn(B, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    check_vs_pgc(method, model, [model.features[19]], funcam.split(model, "features.19"), x, CLASSES)


def test_fx_cut_before_inplace_op(mini_vgg) -> None:
    """Cutting at a conv followed by an in-place ReLU: the map is of the conv output (pre-ReLU)."""
    model = mini_vgg
    x = torch.randn(B, 3, 24, 40, generator=torch.Generator().manual_seed(6))
    feature = lambda m, xb: hooked_forward(m, [m.features[8]], xb)  # noqa: E731
    a, g = hooked_loop(model, x, class_scores(CLASSES), feature, cnn_to_map)
    maps = funcam.hirescam(funcam.split(model, "features.8"), x, CLASSES, relu=False)
    for b in range(B):
        for k in range(K):
            ref = rule("hirescam", g[b][k][0], a[b][0])
            assert_scaled_close(maps[b, k], ref, ref.abs().max().item(), 2e-5, f"b={b} k={k}")


# ---------------------------------------------------------------------------------------------------
# captum
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relu", [True, False])
def test_captum_layer_gradcam(tv_resnet18, relu) -> None:
    from captum.attr import LayerGradCam
    model = tv_resnet18
    x = torch.randn(B, 3, 96, 128, generator=torch.Generator().manual_seed(8))
    maps = funcam.gradcam(funcam.split(model, "layer4"), x, CLASSES, relu=relu).detach()
    lgc = LayerGradCam(model, model.layer4)
    for k in range(K):
        ref = lgc.attribute(x, target=CLASSES[:, k].tolist(), relu_attributions=relu).detach()
        assert ref.shape == (B, 1, 3, 4)
        assert bool(ref.abs().amax() > 0)
        for b in range(B):
            scale = ref[b, 0].abs().max().item() or 1.0
            assert_scaled_close(maps[b, k], ref[b, 0], scale, 1e-5, f"captum relu={relu} b={b} k={k}")
    # shared target as an int
    ref = lgc.attribute(x, target=3, relu_attributions=relu).detach()
    ours = funcam.gradcam(funcam.split(model, "layer4"), x, 3, relu=relu).detach()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------------
# Analytic identity: global average pool + linear head
# ---------------------------------------------------------------------------------------------------

def test_gap_linear_closed_form() -> None:
    """timm resnet18: logit_k = W_k . mean_hw A + b_k, so dlogit_k/dA_chw = W_kc / (h w) and the pre-ReLU
    Grad-CAM map is einsum('kc,bchw->bkhw', W[classes], A) / (h w); HiResCAM gives the same map, and
    its spatial sum is logit_k - b_k (HiResCAM's faithfulness)."""
    model = timm_model("resnet18", num_classes=N_CLASSES).double()
    x = torch.randn(B, 3, 96, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    sp = funcam.split(model)
    with torch.no_grad():
        a = model.forward_features(x)
        logits = model(x)
    h, w = a.shape[2:]
    wk = model.fc.weight[CLASSES].detach()  # (B, K, C)
    expected = torch.einsum("bkc,bchw->bkhw", wk, a) / (h * w)
    assert bool(expected.abs().amax() > 0)
    out = funcam.cam(sp, x, CLASSES, relu=False)
    torch.testing.assert_close(out.maps.detach(), expected, rtol=0, atol=1e-12 * expected.abs().max().item())
    hires = funcam.hirescam(sp, x, CLASSES, relu=False).detach()
    torch.testing.assert_close(hires, expected, rtol=0, atol=1e-12 * expected.abs().max().item())
    bias = model.fc.bias.detach()[CLASSES]
    torch.testing.assert_close(hires.sum(dim=(2, 3)), logits.gather(1, CLASSES) - bias, rtol=1e-10, atol=1e-12)
    relu_maps = funcam.gradcam(sp, x, CLASSES).detach()
    torch.testing.assert_close(relu_maps, expected.clamp_min(0), rtol=0, atol=1e-12 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------------
# Properties of the batched API
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prop_models():
    resnet = timm_model("resnet18", num_classes=N_CLASSES)
    vit = timm_model("vit_tiny_patch16_224", num_classes=N_CLASSES, seed=None, img_size=(48, 80), global_pool="avg")
    return {"resnet18": (resnet, (96, 128)), "vit_avg": (vit, (48, 80))}


@pytest.fixture(params=["resnet18", "vit_avg"])
def prop(request, prop_models):
    model, size = prop_models[request.param]
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(10))
    return funcam.split(model), x, model


def close(a, b, what=""):
    a, b = a.detach(), b.detach()
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max abs error {err:.3g} > 1e-5 * {scale:.3g}"


def test_batch_equals_loop(prop) -> None:
    sp, x, _ = prop
    classes = torch.tensor([[1, 4, 7], [7, 0, 9], [3, 3, 2]])
    for method in ("gradcam", "gradcampp", "argmax_channel"):
        batched = funcam.cam(sp, x, classes, method=method, relu=False).maps
        assert bool(batched.abs().amax() > 0)
        looped = torch.cat([funcam.cam(sp, x[b:b + 1], classes[b:b + 1], method=method, relu=False).maps
                            for b in range(x.shape[0])])
        close(batched, looped, method)


def test_class_permutation_permutes_maps(prop) -> None:
    sp, x, _ = prop
    classes = torch.tensor([1, 4, 7, 9])
    perm = torch.tensor([2, 0, 3, 1])
    for method in ("gradcam", "hirescam", "gradcampp"):
        maps = funcam.cam(sp, x, classes, method=method, relu=False).maps
        maps_p = funcam.cam(sp, x, classes[perm], method=method, relu=False).maps
        assert bool(maps.abs().amax() > 0)
        close(maps_p, maps[:, perm], method)


def test_shared_and_per_image_classes_agree(prop) -> None:
    sp, x, _ = prop
    shared = funcam.cam(sp, x, torch.tensor([2, 5, 8]), relu=False)
    per_image = funcam.cam(sp, x, torch.tensor([[2, 5, 8]] * 3), relu=False)
    as_list = funcam.cam(sp, x, [2, 5, 8], relu=False)
    assert bool(shared.maps.abs().amax() > 0)
    torch.testing.assert_close(shared.classes, per_image.classes)
    torch.testing.assert_close(as_list.classes, per_image.classes)
    close(per_image.maps, shared.maps)
    close(as_list.maps, shared.maps)
    # an int is one shared class, the same as column 1 of the shared call
    one = funcam.cam(sp, x, 5, relu=False)
    assert one.maps.shape[1] == 1 and torch.equal(one.classes, torch.full((3, 1), 5))
    close(one.maps[:, 0], shared.maps[:, 1])
    # per-image classes: image b's maps equal a shared call with image b's classes
    per = torch.tensor([[2, 5, 8], [0, 1, 2], [9, 9, 3]])
    maps = funcam.cam(sp, x, per, relu=False).maps
    for b in range(3):
        close(maps[b], funcam.cam(sp, x, per[b], relu=False).maps[b], f"image {b}")


def test_top_k(prop) -> None:
    sp, x, model = prop
    with torch.no_grad():
        ref_logits = model(x)
    out = funcam.cam(sp, x, top_k=3, relu=False)
    torch.testing.assert_close(out.logits.detach(), ref_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.classes, ref_logits.topk(3, dim=1).indices)
    close(out.maps, funcam.cam(sp, x, ref_logits.topk(3, dim=1).indices, relu=False).maps)
    default = funcam.cam(sp, x)  # top-1
    assert torch.equal(default.classes, ref_logits.argmax(1, keepdim=True))


def test_chunk_size(prop) -> None:
    sp, x, _ = prop
    classes = torch.tensor([[1, 4, 7, 2], [7, 0, 9, 2], [3, 3, 2, 8]])
    for method in ("gradcam", "layercam", "xgradcam"):
        full = funcam.cam(sp, x, classes, method=method, relu=False).maps
        for chunk in (1, 3):
            chunked = funcam.cam(sp, x, classes, method=method, relu=False, chunk_size=chunk).maps
            torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6 * full.abs().max().item())


def test_shortcuts_equal_cam(prop_models) -> None:
    model, size = prop_models["resnet18"]
    sp = funcam.split(model)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(11))
    for method in funcam.METHODS:
        a = getattr(funcam, method)(sp, x, [1, 6], relu=False)
        b = funcam.cam(sp, x, [1, 6], method=method, relu=False).maps
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Slow: Swin at its native 224 size
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam", "layercam"])
def test_loop_oracle_swin_224(method) -> None:
    fam = build(Spec("swin224", "swin_tiny_patch4_window7_224", (224, 224), "swin", cut="norm2"))
    a, g = fam.oracle(torch.float64)
    maps = funcam.cam(fam.split(torch.float64), fam.x[torch.float64], CLASSES, method=method, relu=False).maps
    assert maps.shape == (B, K, 7, 7)
    for b in range(B):
        for k in range(K):
            ref = rule(method, g[b][k], a[b])
            assert_scaled_close(maps[b, k], ref, ref.abs().max().item(), 1e-10, f"swin224 b={b} k={k}")
