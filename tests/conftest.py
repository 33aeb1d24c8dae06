"""The one model factory of the test suite: tiny models with random weights (timm ``pretrained=False``, torchvision
``weights=None``, Hugging Face models from tiny configs); nothing is downloaded.

* ``make_model(name)`` / ``make_input(name)``: timm models of ``FAMILIES`` / ``VARIANTS``, cached, float32, 10 classes.
* ``timm_model``, ``tv_model``, ``hf_model``: a fresh model of one library (seeded, eval mode), for the tests that
  need other options than the cached ones.
* ``ZOO`` / ``make_zoo_model(name)``: one tiny model per family of any library (timm, torchvision, Hugging Face),
  with its input size, the cut a user would pick and its layout written by hand; float64, noised, 5 classes.
* ``noised(model)``: zero-initialised parameters filled with small noise; ``sharpen_attention(model)``.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import os
import weakref
from typing import Any, Callable, NamedTuple

import pytest
import timm
import timm.models.mlp_mixer
import timm.models.volo
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.convnext import CNBlockConfig

import funcam
from funcam._src.core import methods
from funcam._src.core.lrp import as_method
from tests._oracle import nchw, nhwc, tokens

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's test command runs one pytest-xdist worker per core: one intra-op thread each, so that two
    # workers do not fight over the same two cores (tests that measure threads set their own count).
    torch.set_num_threads(1)

# name -> (timm kwargs, input size (H, W)); sizes are the smallest each family accepts cheaply.
FAMILIES = {
    "resnet18": ({}, (64, 64)),
    "convnext_atto": ({}, (64, 64)),
    "tf_efficientnet_lite0": ({}, (64, 64)),
    "regnetx_002": ({}, (64, 64)),
    "mobilenetv3_small_050": ({}, (64, 64)),
    "vgg11": ({}, (64, 64)),
    "densenet121": ({}, (64, 64)),
    "vit_tiny_patch16_224": ({"img_size": 64}, (64, 64)),  # CLS-token pooled
    "vit_tiny_patch16_224-avg": ({"img_size": (48, 80), "global_pool": "avg"}, (48, 80)),  # non-square 3x5
    "deit_tiny_distilled_patch16_224": ({"img_size": 64}, (64, 64)),
    "vit_small_patch14_reg4_dinov2": ({"img_size": 56}, (56, 56)),  # 4 registers + CLS
    "swin_tiny_patch4_window7_224": ({}, (224, 224)),
}

# Narrowed variants for the tests of one route: made by make_model / make_input, but not in the ``family`` fixture.
VARIANTS = {
    # timm's Swin v1 at C = 32 in the last stage (8x8 tokens, 4x4 shifted windows in both stages)
    "swin_tiny_patch4_window7_224-narrow": ({"img_size": 64, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
                                            "window_size": 4}, (64, 64)),
}


def timm_model(name: str, *, num_classes: int = 10, seed: int | None = 0, **kwargs: Any) -> nn.Module:
    """A fresh timm model: random weights (``pretrained=False``) drawn after ``torch.manual_seed(seed)`` (None: from
    the global generator as it stands), eval mode. Not cached: the caller may change it."""
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def tv_model(name: str, *, num_classes: int = 10, seed: int | None = 0, **kwargs: Any) -> nn.Module:
    """A fresh torchvision model from the builder ``torchvision.models.<name>`` (``"resnet18"``,
    ``"segmentation.lraspp_mobilenet_v3_large"``): random weights (``weights=None``, and ``weights_backbone=None``
    for a segmentation model) drawn after ``torch.manual_seed(seed)`` (None: the global generator), eval mode."""
    builder: Any = torchvision.models
    for part in name.split("."):
        builder = getattr(builder, part)
    if name.startswith("segmentation."):
        kwargs = {"weights_backbone": None, **kwargs}
    if seed is not None:
        torch.manual_seed(seed)
    return builder(weights=None, num_classes=num_classes, **kwargs).eval()


def hf_model(model_cls: str, config_cls: str, **config: Any) -> nn.Module:
    """A Hugging Face model built from a tiny config (``transformers.<config_cls>(**config)``, random weights, from
    the global generator), eval mode. transformers is imported on first use: importing it takes seconds that most
    test modules do not need."""
    transformers = importlib.import_module("transformers")
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()


_SHARED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # make_model's cached models: noised() refuses them


@functools.lru_cache(maxsize=None)
def make_model(name: str, num_classes: int = 10, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The cached timm model of ``FAMILIES`` / ``VARIANTS`` (seed 0): shared by every test, copy it to change it."""
    kwargs, _ = {**FAMILIES, **VARIANTS}[name]
    model = timm_model(name.split("-")[0], num_classes=num_classes, **kwargs).to(dtype)
    _SHARED.add(model)
    return model


def noised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every all-zero floating parameter with small noise: zero-initialised heads, layer scales and post-norms
    would make a zero map the weights' doing, not funcam's. Refuses make_model's shared models: noising one in
    place changed every later test of the same worker that used it (maps then depended on the order of the tests)."""
    if model in _SHARED:
        raise AssertionError("noised(copy.deepcopy(make_model(...))) would change the model every test shares: "
                             "noised(copy.deepcopy(make_model(...)))")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not bool(p.any()):
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def quick_options(method: str) -> dict:
    """Options for the tests that run every method of the table: the methods whose cost is num_samples x C masked
    forwards (SS-CAM, IS-CAM) run one set of C forwards there, the input-gradient ones a few samples (their samples
    are tested in tests/core/test_perturbation.py and test_attributions.py); the methods that draw noise (SS-CAM,
    SmoothGrad, VarGrad, GradientShap) draw it from a generator seeded anew for each call, so that two calls agree
    and the global random state is untouched."""
    name = method.replace("-", "_")
    # the sampled and sliding methods with few samples / positions: their counts are tested against the peers in
    # tests/core/test_attributions.py and test_occlusion.py (Integrated Gradients' 50 steps alone took 40 s here)
    opts = {"sscam": {"num_samples": 1}, "iscam": {"num_samples": 1}, "integrated_gradients": {"n_steps": 4},
            "smoothgrad": {"nt_samples": 2}, "vargrad": {"nt_samples": 2}, "gradient_shap": {"n_samples": 2},
            "occlusion": {"sliding_window_shapes": 32, "strides": 32}}.get(name, {})
    if any(o.name == "generator" for o in methods.get(name).options):
        opts["generator"] = torch.Generator().manual_seed(0)
    return opts


def sharpen_attention(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale every block's qkv weights of a timm ViT in place: random-weight ViTs attend almost uniformly, which would
    make every attention map nearly constant and the comparisons weak."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(factor)
    return model


def make_input(name: str, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    h, w = {**FAMILIES, **VARIANTS}[name][1]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The zoo: one tiny model per family of any library, the cut a user would pick, and its layout written by hand
# ---------------------------------------------------------------------------------------------------------------------

ZOO_CLASSES = 5


class ZooModel(NamedTuple):
    build: Callable[[], nn.Module]  # draws from the global generator (make_zoo_model seeds it)
    size: tuple[int, int]  # the input's (H, W)
    layers: tuple[str, ...]  # the cut a user would pick
    layout: str  # for the record: NCHW, NHWC, tokens p=.. gh x gw
    to_map: Callable[[Tensor], Tensor]  # the cut's value -> (B, C, h, w), written from knowledge of the family
    slow: bool = False
    xfail: str | None = None  # set when the library fails on this family (every check of it is expected to fail)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return functools.partial(timm_model, name, num_classes=ZOO_CLASSES, seed=None, **kw)


def _hf(model_cls: str, config_cls: str, **cfg: Any) -> Callable[[], nn.Module]:
    return functools.partial(hf_model, model_cls, config_cls, num_labels=ZOO_CLASSES, **cfg)


_TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
_HF_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)

ZOO: dict[str, ZooModel] = {
    # --- timm transformers with token features (the graph route) ---
    # BEiT: average-pooled (fc_norm after the mean of the patch tokens): the last block's output tokens, CLS first
    "timm_beit": ZooModel(_timm("beit_base_patch16_224", img_size=32, patch_size=8, **_TINY_VIT), (32, 32),
                           ("blocks.1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    # CaiT / XCiT: class attention reads the patch tokens; the cut is norm1 of the last class-attention block,
    # whose input is cat(CLS, patches)
    "timm_cait": ZooModel(_timm("cait_xxs24_224", img_size=32, patch_size=8, depth_token_only=2, **_TINY_VIT),
                           (32, 32), ("blocks_token_only.1.norm1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "timm_xcit": ZooModel(_timm("xcit_nano_12_p8_224", img_size=32, embed_dim=32, depth=2, num_heads=2,
                                 cls_attn_layers=2), (32, 32), ("cls_attn_blocks.1.norm1",), "tokens p=1 4x4",
                           tokens(1, 4, 4)),
    # PiT: CLS-pooled, three pooling stages (64 px: 7x7 -> 4x4 -> 2x2 patches); norm1 of the last stage's block
    "timm_pit": ZooModel(_timm("pit_ti_224", img_size=64, base_dims=[8, 8, 8], depth=[1, 1, 1], heads=[2, 2, 2]),
                          (64, 64), ("transformers.2.blocks.0.norm1",), "tokens p=1 2x2", tokens(1, 2, 2)),
    # Twins-SVT: average pooled, final norm of the last stage's tokens (64 px / 32 = 2x2)
    "timm_twins": ZooModel(_timm("twins_svt_small", embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2),
                                  depths=(1, 1, 1, 1)), (64, 64), ("norm",), "tokens p=0 2x2", tokens(0, 2, 2)),
    # CrossViT: two branches (patch 12: 4x4, patch 16: 3x3); the last value on a grid is the small-patch branch's
    # tokens inside the last fusion (branch 1's CLS cross-attends to them): cat(projected CLS, 16 patches)
    "timm_crossvit": ZooModel(_timm("crossvit_tiny_240", img_size=48, img_scale=(1.0, 1.0), patch_size=[12, 16],
                                     embed_dim=[16, 32], depth=[[1, 1, 0]], num_heads=[2, 2], mlp_ratio=[2, 2, 1]),
                               (48, 48), ("blocks.0.fusion.1.norm1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    # VOLO: class attention then a head reading CLS and (aux head) every patch token: the final norm
    "timm_volo": ZooModel(lambda: timm.models.volo.VOLO(img_size=32, layers=[1, 1, 1, 1], stem_hidden_dim=8,
                                                         embed_dims=(32, 32, 32, 32), num_heads=(1, 1, 1, 1),
                                                         num_classes=ZOO_CLASSES),
                           (32, 32), ("norm",), "tokens p=1 2x2", tokens(1, 2, 2)),
    # TNT: CLS-pooled; the outer tokens before the last outer attention
    "timm_tnt": ZooModel(_timm("tnt_s_patch16_224", img_size=32, patch_size=8, embed_dim=32, inner_dim=8, depth=2,
                                num_heads_outer=2), (32, 32), ("blocks.1.norm_out",), "tokens p=1 4x4",
                          tokens(1, 4, 4)),
    # ConViT: GPSA block then an MHSA block with the CLS token (embed_dim is per head: 2 x 32 = 64 channels)
    "timm_convit": ZooModel(_timm("convit_tiny", img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2,
                                   local_up_to_layer=1), (32, 32), ("blocks.1.norm1",), "tokens p=1 4x4",
                             tokens(1, 4, 4)),
    # LeViT: average-pooled tokens (B, N, C) of the last stage (128 px / 16 / 2 / 2 = 2x2); LeViT's attention
    # biases fix the input size
    "timm_levit": ZooModel(_timm("levit_128s", img_size=128, embed_dim=(16, 32, 48), key_dim=8, num_heads=(2, 2, 2),
                                  depth=(1, 1, 1)), (128, 128), ("stages",), "tokens p=0 2x2", tokens(0, 2, 2),
                            slow=True),
    # EfficientFormer: the last stage flattens to tokens for its attention block (fixed 7x7 biases: 224 px)
    "timm_efficientformer": ZooModel(_timm("efficientformer_l1", depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32)),
                                      (224, 224), ("norm",), "tokens p=0 7x7", tokens(0, 7, 7)),
    # MLP-Mixer: token-mixing MLPs over a fixed 4x8 grid, non-square
    "timm_mixer": ZooModel(lambda: timm.models.mlp_mixer.MlpMixer(img_size=(32, 64), patch_size=8, num_blocks=2,
                                                                   embed_dim=32, num_classes=ZOO_CLASSES),
                            (32, 64), ("norm",), "tokens p=0 4x8", tokens(0, 4, 8)),
    # EVA02 (rope, swiglu; average-pooled): the last block's tokens, non-square 4x8
    "timm_eva02": ZooModel(_timm("eva02_tiny_patch14_224", img_size=(32, 64), patch_size=8, **_TINY_VIT), (32, 64),
                            ("blocks.1",), "tokens p=1 4x8", tokens(1, 4, 8)),
    # DeiT3 (layer scale, no class pos-embed): timm's ViT route, CLS-pooled: norm1 of the last block, non-square
    "timm_deit3": ZooModel(_timm("deit3_small_patch16_224", img_size=(32, 64), patch_size=8, **_TINY_VIT), (32, 64),
                            ("blocks.1.norm1",), "tokens p=1 4x8", tokens(1, 4, 8)),
    # NaFlexViT (4 register tokens, no CLS, average-pooled): the last block's tokens
    "timm_naflexvit": ZooModel(_timm("naflexvit_base_patch16_gap", img_size=32, patch_size=8, **_TINY_VIT), (32, 32),
                                ("blocks.1",), "tokens p=4 4x4", tokens(4, 4, 4)),
    # --- timm models whose forward_features is a map (timm's own split) ---
    # MambaOut: channels-last stages, forward_features (B, h, w, C); non-square 2x4
    "timm_mambaout": ZooModel(_timm("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), (64, 128),
                               ("forward_features",), "NHWC 2x4", nhwc),
    # SwinV2: post-norm blocks; forward_features is the final norm, channels-last (64 px / 4 / 2 = 8x8)
    "timm_swinv2": ZooModel(_timm("swinv2_tiny_window8_256", img_size=64, window_size=4, embed_dim=16, depths=(1, 1),
                                   num_heads=(1, 2)), (64, 64), ("forward_features",), "NHWC 8x8", nhwc),
    # TResNet: space-to-depth stem (the first conv reads 48 channels), NCHW
    "timm_tresnet": ZooModel(_timm("tresnet_m", layers=[1, 1, 1, 1], width_factor=0.25), (64, 64),
                              ("forward_features",), "NCHW 2x2", nchw),
    # --- torchvision, no layer names ---
    "tv_vit": ZooModel(lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                     num_heads=2, hidden_dim=32, mlp_dim=64,
                                                                     num_classes=ZOO_CLASSES),
                        (32, 32), ("encoder.layers.encoder_layer_1.ln_1",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "tv_swin": ZooModel(lambda: torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                                                    num_heads=[1, 2], window_size=[4, 4],
                                                                    num_classes=ZOO_CLASSES),
                         (32, 64), ("norm",), "NHWC 4x8", nhwc),
    "tv_maxvit": ZooModel(lambda: torchvision.models.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2,
                                                             block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                                                             stochastic_depth_prob=0.0, num_classes=ZOO_CLASSES),
                           (64, 64), ("blocks.1",), "NCHW 8x8", nchw),
    "tv_resnet18": ZooModel(lambda: torchvision.models.resnet18(num_classes=ZOO_CLASSES), (64, 64), ("layer4",),
                             "NCHW 2x2", nchw),
    "tv_convnext": ZooModel(lambda: torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)],
                                                                 num_classes=ZOO_CLASSES),
                             (64, 64), ("features",), "NCHW 8x8", nchw),
    "tv_mobilenet_v3": ZooModel(lambda: torchvision.models.mobilenet_v3_small(num_classes=ZOO_CLASSES), (64, 64),
                                 ("features",), "NCHW 2x2", nchw),
    "tv_efficientnet_b0": ZooModel(lambda: torchvision.models.efficientnet_b0(num_classes=ZOO_CLASSES), (64, 64),
                                    ("features",), "NCHW 2x2", nchw, slow=True),
    # --- Hugging Face transformers, tiny random configs ---
    "hf_vit": ZooModel(_hf("ViTForImageClassification", "ViTConfig", **_HF_VIT), (32, 32),
                        ("vit.layers.1.layernorm_before",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "hf_deit": ZooModel(_hf("DeiTForImageClassification", "DeiTConfig", **_HF_VIT), (32, 32),
                         ("deit.layers.1.layernorm_before",), "tokens p=2 4x4", tokens(2, 4, 4)),
    "hf_dinov2": ZooModel(_hf("Dinov2ForImageClassification", "Dinov2Config", hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8),
                           (32, 32), ("dinov2",), "tokens p=1 4x4", tokens(1, 4, 4)),
    "hf_swin": ZooModel(_hf("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                             depths=[1, 1], num_heads=[1, 2], window_size=4), (32, 32),
                         ("swin.layernorm",), "tokens p=0 4x4", tokens(0, 4, 4)),
    "hf_convnext": ZooModel(_hf("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[8, 16],
                                 depths=[1, 1]), (64, 64), ("convnext.encoder",), "NCHW 8x8", nchw),
    "hf_resnet": ZooModel(_hf("ResNetForImageClassification", "ResNetConfig", embedding_size=8, hidden_sizes=[8, 16],
                               depths=[1, 1], layer_type="basic"), (64, 64), ("resnet.encoder",), "NCHW 8x8", nchw),
}


def noised_double(build: Callable[[], nn.Module], size: tuple[int, int], seed: int = 0) -> tuple[nn.Module, Tensor]:
    """``build()`` after ``torch.manual_seed(seed)``, noised, eval, float64; and x (2, 3, *size) float64."""
    torch.manual_seed(seed)
    model = noised(build(), seed).eval().double()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, x


def make_zoo_model(name: str, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """(model, x) of ``ZOO[name]``: a fresh float64 model (noised: libraries zero-initialise heads, layer scales and
    post-norms) and its input (2, 3, H, W)."""
    entry = ZOO[name]
    return noised_double(entry.build, entry.size, seed)


@contextlib.contextmanager
def record_vmap_chunks(monkeypatch):
    """Records the ``chunk_size`` of every ``torch.func.vmap`` made inside the block (the engine's chunking)."""
    seen: list = []
    real = torch.func.vmap

    def spy(fn, *args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return real(fn, *args, chunk_size=chunk_size, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.func, "vmap", spy)
        yield seen


class FullDisk:
    """A file opened for writing on a full disk: the first 10 bytes of a write land, then ENOSPC with no file
    name (as a write or close fails there)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast and avoids OpenMP's stalls when other processes hold the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


# Hypothesis: "ci" (the default) is deterministic and small, so CI is reproducible and quick; "long" explores.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))


def lrp(model, x, classes=None, rule: str = "attnlrp", **kw):
    """``funcam.cam`` with the LRP rule set named ``rule`` (attnlrp, cplrp or a zennit composite): the CAM."""
    method, options = as_method(rule)
    return funcam.cam(model, x, classes, method=method, **options, **kw)
