"""One network, three implementations: the same maps for every relevance method.

A tiny timm ``VisionTransformer`` (32x32 input, 8x8 patches -> a 4x4 grid plus CLS, width 32, 2 blocks of 2 heads,
5 classes, CLS pooling) is ported by hand into Hugging Face's ``ViTForImageClassification`` (q/k/v projections,
its attention through ``F.scaled_dot_product_attention`` or, with ``attn_implementation="eager"``, an explicit
softmax) and torchvision's ``VisionTransformer`` (``nn.MultiheadAttention``, ``in_proj_weight`` = concat(q, k, v)).
The three forwards agree to float rounding, so attention rollout, gradient rollout, Chefer relevance and Grad-CAM at
the default cut must agree too, whatever code computes each model's attention: funcam recomputes timm's
attention from the block's weights and taps the others' attention in their captured graphs.

Random weights would give nearly uniform attention (timm's init is N(0, 0.02)) and maps without structure, so
every parameter is drawn at the scale of a trained network's and the q/k/v weights are then multiplied by 4.
Maps are compared in float64 (to 1e-9 of their scale; 1e-5 for Hugging Face's eager attention, whose softmax
runs in float32); the ported logits are also checked in float32 (1e-5).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTForImageClassification

import funcam

SIZE, PATCH, WIDTH, DEPTH, HEADS, MLP, N_CLASSES = 32, 8, 32, 2, 2, 64, 5
GRID = SIZE // PATCH
CLASSES = torch.tensor([[0, 2, 4], [4, 1, 0]])  # K=3 classes per image, different per image
IMPLS = ("hf_sdpa", "hf_eager", "torchvision")
# float64 tolerances, relative to the reference's scale: Hugging Face's eager attention computes its softmax in
# float32 whatever the model's dtype (modeling_vit.eager_attention_forward), so it matches to float32 rounding only
RTOL = {"hf_sdpa": 1e-9, "hf_eager": 1e-5, "torchvision": 1e-9}
TAPPED = IMPLS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def timm_vit() -> VisionTransformer:
    """The source network, with weights that give the attention some structure (see the module docstring)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                              mlp_ratio=MLP / WIDTH, num_classes=N_CLASSES, global_pool="token")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name in ("cls_token", "pos_embed"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)  # 1 / sqrt(fan_in)
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)  # sharper attention: q.k grows 16x
    return model.eval()


def hf_state(src: dict) -> dict:
    """timm ViT state dict -> Hugging Face ``ViTForImageClassification`` (transformers 5 names)."""
    out = {"vit.embeddings.cls_token": src["cls_token"],
           "vit.embeddings.position_embeddings": src["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
           "vit.layernorm.weight": src["norm.weight"], "vit.layernorm.bias": src["norm.bias"],
           "classifier.weight": src["head.weight"], "classifier.bias": src["head.bias"]}
    for i in range(DEPTH):
        s, d = f"blocks.{i}.", f"vit.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = src[s + f"attn.qkv.{kind}"].chunk(3, dim=0)  # timm's qkv rows: q, k, v, each heads x dim
            out.update({d + f"attention.q_proj.{kind}": q, d + f"attention.k_proj.{kind}": k,
                        d + f"attention.v_proj.{kind}": v,
                        d + f"attention.o_proj.{kind}": src[s + f"attn.proj.{kind}"],
                        d + f"layernorm_before.{kind}": src[s + f"norm1.{kind}"],
                        d + f"layernorm_after.{kind}": src[s + f"norm2.{kind}"],
                        d + f"mlp.fc1.{kind}": src[s + f"mlp.fc1.{kind}"],
                        d + f"mlp.fc2.{kind}": src[s + f"mlp.fc2.{kind}"]})
    return out


def tv_state(src: dict) -> dict:
    """timm ViT state dict -> torchvision ``VisionTransformer``: its MultiheadAttention's ``in_proj_weight`` is
    concat(q, k, v), the row order of timm's ``qkv``."""
    out = {"class_token": src["cls_token"], "encoder.pos_embedding": src["pos_embed"],
           "conv_proj.weight": src["patch_embed.proj.weight"], "conv_proj.bias": src["patch_embed.proj.bias"],
           "encoder.ln.weight": src["norm.weight"], "encoder.ln.bias": src["norm.bias"],
           "heads.head.weight": src["head.weight"], "heads.head.bias": src["head.bias"]}
    for i in range(DEPTH):
        s, d = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        out.update({d + "self_attention.in_proj_weight": src[s + "attn.qkv.weight"],
                    d + "self_attention.in_proj_bias": src[s + "attn.qkv.bias"]})
        for kind in ("weight", "bias"):
            out.update({d + f"self_attention.out_proj.{kind}": src[s + f"attn.proj.{kind}"],
                        d + f"ln_1.{kind}": src[s + f"norm1.{kind}"], d + f"ln_2.{kind}": src[s + f"norm2.{kind}"],
                        d + f"mlp.0.{kind}": src[s + f"mlp.fc1.{kind}"],
                        d + f"mlp.3.{kind}": src[s + f"mlp.fc2.{kind}"]})
    return out


def ported(dtype: torch.dtype) -> dict:
    """name -> the same network in each implementation, eval mode, in ``dtype``."""
    src = timm_vit()
    sd = src.state_dict()
    models = {"timm": src}
    for impl in ("sdpa", "eager"):
        # timm's LayerNorm eps is 1e-6 (Hugging Face's default 1e-12); GELU is the exact (erf) one in both
        cfg = ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
                        image_size=SIZE, patch_size=PATCH, num_channels=3, num_labels=N_CLASSES, layer_norm_eps=1e-6,
                        hidden_act="gelu", qkv_bias=True, attn_implementation=impl)
        hf = ViTForImageClassification(cfg)
        hf.load_state_dict(hf_state(sd), strict=True)
        models[f"hf_{impl}"] = hf
    tv = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                                              hidden_dim=WIDTH, mlp_dim=MLP, num_classes=N_CLASSES)
    tv.load_state_dict(tv_state(sd), strict=True)
    models["torchvision"] = tv
    return {k: m.to(dtype).eval() for k, m in models.items()}


def logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def models():
    return ported(torch.float64)


@pytest.fixture(scope="module")
def splits(models, x):
    """Each implementation's default split, captured once: the relevance functions reuse its graph."""
    return {k: funcam.split(m, example=x) for k, m in models.items()}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def assert_same(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-9) -> None:
    """Equal to ``rtol`` of the reference's largest value, and the reference is a map with structure."""
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max()
    assert scale > 0, "an all-zero reference map compares nothing"
    err = (got - want).abs().max()
    assert err <= rtol * scale, f"max error {err:.3g} at scale {scale:.3g}"


def has_structure(maps: torch.Tensor) -> None:
    """Not all zero, and not flat: each map's values spread by at least 5% of its largest value."""
    flat = maps.reshape(-1, GRID * GRID)
    assert (flat.abs().amax(dim=1) > 0).all()
    assert ((flat.amax(dim=1) - flat.amin(dim=1)) > 0.05 * flat.abs().amax(dim=1)).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_ported_logits_equal(dtype, tol):
    ms = ported(dtype)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        want = ms["timm"](x)
        for name in IMPLS:
            got = logits(ms[name], x)
            rtol = max(tol, RTOL[name]) if dtype == torch.float64 else tol
            assert (got - want).abs().max() <= rtol * want.abs().max(), name
    assert want.std() > 0.1  # the classes differ: gradients per class have something to say


@pytest.mark.parametrize("impl", TAPPED)
def test_block_attentions_equal(models, x, impl):
    with torch.no_grad():
        want = funcam.block_attentions(models["timm"], x)
        got = funcam.block_attentions(models[impl], x)
    assert len(got) == len(want) == DEPTH
    for g, w in zip(got, want):
        assert_same(g, w, RTOL[impl])
    # sharpened: the largest attention weight of each row is well above uniform (1 / 17)
    assert want[-1].amax(dim=-1).mean() > 3 / (GRID * GRID + 1)


@pytest.mark.parametrize("impl", TAPPED)
@pytest.mark.parametrize("head_fusion, discard_ratio", [("mean", 0.0), ("max", 0.5)])
def test_attention_rollout_equal(splits, x, impl, head_fusion, discard_ratio):
    with torch.no_grad():
        want = funcam.attention_rollout(splits["timm"], x, head_fusion=head_fusion, discard_ratio=discard_ratio)
        got = funcam.attention_rollout(splits[impl], x, head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert want.shape == (2, 1, GRID, GRID)  # one class-agnostic map per image, (B, K=1, h, w)
    has_structure(want)
    assert_same(got, want, RTOL[impl])


@pytest.mark.parametrize("impl", TAPPED)
@pytest.mark.parametrize("method", ["grad_rollout", "chefer_relevance"])
def test_relevance_equal(splits, x, impl, method):
    fn = getattr(funcam, method)
    with torch.no_grad():
        want = fn(splits["timm"], x, CLASSES)
        got = fn(splits[impl], x, CLASSES)
    assert want.shape == (2, 3, GRID, GRID)
    has_structure(want)
    assert (want[:, 0] - want[:, 1]).abs().max() > 0.05 * want.abs().max()  # class-specific
    assert_same(got, want, RTOL[impl])


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcam_default_cut_equal(splits, x, impl):
    """Grad-CAM at each implementation's default cut: the input of the last block's attention (its pre-norm),
    with the residual stream held constant, so the same feature and the same gradient in all three."""
    cuts = {"timm": ("blocks.1.norm1",), "hf_sdpa": ("vit.layers.1.layernorm_before",),
            "hf_eager": ("vit.layers.1.layernorm_before",),
            "torchvision": ("encoder.layers.encoder_layer_1.ln_1",)}
    assert (splits["timm"].layers, splits[impl].layers) == (cuts["timm"], cuts[impl])
    with torch.no_grad():
        want = funcam.gradcam(splits["timm"], x, CLASSES, relu=False)
        got = funcam.gradcam(splits[impl], x, CLASSES, relu=False)
    assert want.shape == (2, 3, GRID, GRID)
    has_structure(want)
    assert_same(got, want, RTOL[impl])


@pytest.fixture(scope="module")
def models32():
    return ported(torch.float32)


@pytest.mark.parametrize("method", ["attention_rollout", "grad_rollout", "chefer_relevance"])
def test_hf_eager_float32_equal(models32, method):
    """Hugging Face's explicit-softmax attention, in float32 (where its float32 softmax is the model's dtype)."""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    fn = getattr(funcam, method)
    args = () if method == "attention_rollout" else (CLASSES,)
    with torch.no_grad():
        want = fn(models32["timm"], x, *args)
        got = fn(models32["hf_eager"], x, *args)
    has_structure(want)
    assert_same(got, want, 1e-5)
