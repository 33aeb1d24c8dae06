"""Splits: head(extract(x)) == model(x) for every family, the ViT cut rule, FX cuts, and no model mutation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import funcam
from funcam._src.core.engine import as_features
from tests._oracle import hooked_forward, tokens
from tests.conftest import make_input, make_model, timm_model, tv_model

# The fused attention kernel and the explicit softmax used in the ViT head differ by float rounding.
SPLIT_ATOL = {"vit": 1e-5, "deit": 1e-5}


def _atol(name: str) -> float:
    return next((v for k, v in SPLIT_ATOL.items() if name.startswith(k)), 0.0)


def test_split_invariant(family):
    model, x = make_model(family), make_input(family)
    sp = funcam.split(model)
    feats = sp.extract(x)
    torch.testing.assert_close(sp.head(feats), model(x), atol=_atol(family), rtol=0)
    fs, _ = as_features(feats)
    fmap = fs.maps[0]
    assert fmap.ndim == 4 and fmap.shape[0] == x.shape[0]
    funcam.check_split(sp, x, model, atol=1e-5)  # also: the gradient reaches the map


@pytest.mark.parametrize("name,grid", [
    ("vit_tiny_patch16_224", (4, 4)),
    ("vit_tiny_patch16_224-avg", (3, 5)),
    ("deit_tiny_distilled_patch16_224", (4, 4)),
    ("vit_small_patch14_reg4_dinov2", (4, 4)),
    ("swin_tiny_patch4_window7_224", (7, 7)),
])
def test_token_grid_and_prefix(name, grid):
    """Prefix tokens (1 CLS, CLS + distillation, CLS + 4 registers) leave the map; the grid is (h, w): the map is the
    cut module's output in the model's own forward (a hook), its prefix tokens dropped and its patch tokens laid out
    row-major on the grid by hand."""
    model, x = make_model(name), make_input(name)
    sp = funcam.split(model)
    fs, _ = as_features(sp.extract(x))
    assert tuple(fs.maps[0].shape) == (2, model.num_features, *grid)
    prefix = getattr(model, "num_prefix_tokens", 0)  # Swin: none
    if hasattr(model, "num_prefix_tokens"):
        # the map's first cell is the first patch token, not a prefix token
        assert fs.context[1].shape[1] == model.num_prefix_tokens
    with torch.no_grad():
        _, (cut,) = hooked_forward(model, [model.get_submodule(sp.layers[0])], x)
    want = tokens(prefix, *grid)(cut)
    assert want.abs().amax() > 0
    torch.testing.assert_close(fs.maps[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,layers", [
    ("vit_tiny_patch16_224", ("blocks.11.norm1",)),
    ("vit_tiny_patch16_224-avg", ("blocks.11.norm2",)),
    ("deit_tiny_distilled_patch16_224", ("blocks.11.norm1",)),
    ("swin_tiny_patch4_window7_224", ("layers.3.blocks.1.norm2",)),
    ("resnet18", ("forward_features",)),
])
def test_split_records_the_cut(name, layers):
    assert funcam.split(make_model(name)).layers == layers


def test_vit_cut_rule_follows_pooling():
    tok, avg = make_model("vit_tiny_patch16_224"), make_model("vit_tiny_patch16_224-avg")
    x_tok, x_avg = make_input("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224-avg")
    # norm1 output for CLS pooling, norm2 output for average pooling: compare against the modules directly.
    t = tok.norm_pre(tok.patch_drop(tok._pos_embed(tok.patch_embed(x_tok))))
    t = tok.blocks[:-1](t)
    expect = tok.blocks[-1].norm1(t)[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(funcam.split(tok).extract(x_tok).maps[0], expect)
    t = avg.norm_pre(avg.patch_drop(avg._pos_embed(avg.patch_embed(x_avg))))
    t = avg.blocks[:-1](t)
    blk = avg.blocks[-1]
    t = t + blk.ls1(blk.attn(blk.norm1(t)))
    expect = blk.norm2(t)[:, 1:].transpose(1, 2).reshape(2, -1, 3, 5)
    torch.testing.assert_close(funcam.split(avg).extract(x_avg).maps[0], expect)


def test_cls_vit_norm2_gradient_is_exactly_zero_and_detected():
    """The fact behind the rule: at norm2 of a CLS-pooled ViT no patch token reaches the logits."""
    model, x = make_model("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224")
    blk = model.blocks[-1]

    def extract(x):
        t = model.blocks[:-1](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        t = t + blk.ls1(blk.attn(blk.norm1(t)))
        f = blk.norm2(t)
        return funcam.Features((f[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4),), (t, f[:, :1]))

    def head(feats):
        (fmap,), (t, prefix) = feats.maps, feats.context
        tokens = torch.cat([prefix, fmap.flatten(2).transpose(1, 2)], dim=1)
        return model.forward_head(model.norm(t + blk.ls2(blk.mlp(tokens))))

    hand = funcam.Split(extract, head)
    torch.testing.assert_close(head(extract(x)), model(x))
    # a hand-made split has no first-use check: the zero maps are returned with a warning saying why
    with pytest.warns(funcam.ZeroMapWarning, match="gradient of every requested score .* is exactly zero"):
        zero = funcam.gradcam(hand, x, [0, 1, 2], relu=False)
    assert zero.shape == (2, 3, 4, 4) and not bool(zero.any())
    with pytest.raises(ValueError, match="token_cut='norm1'"):
        funcam.check_split(hand, x, model)
    with pytest.raises(ValueError, match="token_cut='norm1'"):
        funcam.split(model, token_cut="norm2")
    # the override is honoured where it is valid
    avg = make_model("vit_tiny_patch16_224-avg")
    xa = make_input("vit_tiny_patch16_224-avg")
    sp1 = funcam.split(avg, token_cut="norm1")
    torch.testing.assert_close(sp1.head(sp1.extract(xa)), avg(xa), atol=1e-5, rtol=0)
    funcam.check_split(sp1, xa, avg, atol=1e-5)


def test_swin_norm1_override():
    model, x = make_model("swin_tiny_patch4_window7_224"), make_input("swin_tiny_patch4_window7_224")
    sp = funcam.split(model, token_cut="norm1")
    funcam.check_split(sp, x, model, atol=1e-5)


@pytest.fixture(scope="module")
def tv_resnet():
    return tv_model("resnet18")


@pytest.mark.parametrize("layer", ["layer4", "layer3", "layer4.1.conv2", "layer4_1_relu_1", ["layer3", "layer4"],
                                   ["layer2", "layer3.0", "layer4"]])
def test_fx_cut_invariant(tv_resnet, layer):
    x = torch.randn(2, 3, 64, 64)
    sp = funcam.split(tv_resnet, layer)
    feats = sp.extract(x)
    torch.testing.assert_close(sp.head(feats), tv_resnet(x), atol=0, rtol=0)
    names = [layer] if isinstance(layer, str) else layer
    assert len(feats.maps) == len(names) and feats.chained == (len(names) > 1)
    assert sorted(sp.layers) == sorted(names)
    funcam.check_split(sp, x, tv_resnet)


def test_fx_cut_is_the_submodule_output(tv_resnet):
    x = torch.randn(2, 3, 64, 64)
    m = tv_resnet
    with torch.no_grad():
        _, (a3, a4) = hooked_forward(m, [m.layer3, m.layer4], x)  # the model's own forward
    sp = funcam.split(m, ["layer4", "layer3"])
    assert sp.layers == ("layer3", "layer4")  # ordered by position in the graph
    maps = sp.extract(x).maps
    torch.testing.assert_close(maps[0], a3, atol=0, rtol=0)
    torch.testing.assert_close(maps[1], a4, atol=0, rtol=0)


def test_fx_vgg_inplace_relu():
    vgg = tv_model("vgg11")
    x = torch.randn(2, 3, 64, 64)
    sp = funcam.split(vgg, "features.19")  # the last ReLU (in place) of vgg11's features
    torch.testing.assert_close(sp.head(sp.extract(x)), vgg(x), atol=0, rtol=0)
    assert all(mod.inplace for mod in vgg.modules() if isinstance(mod, nn.ReLU))
    # cut at the conv before an in-place ReLU: the head must not write into the extracted map
    sp = funcam.split(vgg, "features.18")
    feats = sp.extract(x)
    before = feats.maps[0].clone()
    assert bool((before < 0).any())
    torch.testing.assert_close(sp.head(feats), vgg(x), atol=0, rtol=0)
    torch.testing.assert_close(feats.maps[0], before, atol=0, rtol=0)
    assert torch.count_nonzero(funcam.hirescam(sp, x, [1], relu=False)) > 0


def test_fx_skip_over_cut_goes_to_context():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 5)

        def forward(self, x):
            h = torch.relu(self.a(x))
            y = self.b(h)
            return self.fc((y + h).mean(dim=(2, 3)))

    model, x = Skip().eval(), torch.randn(2, 3, 8, 8)
    sp = funcam.split(model, "b")
    feats = sp.extract(x)
    h = torch.relu(model.a(x))
    skips = [c for c in feats.context if isinstance(c, torch.Tensor)]
    assert len(skips) == 1 and torch.equal(skips[0], h)  # h skips over the cut and is held constant
    torch.testing.assert_close(sp.head(feats), model(x), atol=0, rtol=0)


def test_unknown_layer_suggests_names(tv_resnet):
    with pytest.raises(ValueError, match=r"unknown layer 'layr4'.*'layer4'"):
        funcam.split(tv_resnet, "layr4")


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.c(x).mean(dim=(2, 3))
            return x.mean(dim=(2, 3))

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="could not capture Branchy"):
        funcam.gradcam(funcam.split(Branchy(), "c"), x, [0])  # one named cut: captured on first use
    with pytest.raises(ValueError, match="could not capture Branchy"):
        funcam.split(Branchy(), "c", example=x)
    # and the tracer_leaves escape hatch does not help a branch in forward itself: still a clear error
    with pytest.raises(ValueError, match="could not trace"):
        funcam.split(Branchy(), "c", tracer_leaves=(nn.Conv2d,))


def test_bad_split_arguments():
    model = make_model("resnet18")
    with pytest.raises(ValueError, match="token_cut must be"):
        funcam.split(model, token_cut="norm3")
    with pytest.raises(ValueError, match="applies to timm ViT and Swin"):
        funcam.split(model, token_cut="norm1")
    with pytest.raises(TypeError, match="nn.Module"):
        funcam.split(lambda x: x)
    with pytest.raises(ValueError, match="pass layer="):
        funcam.split(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224",
                                  pytest.param("swin_tiny_patch4_window7_224", marks=pytest.mark.slow)])
def test_model_untouched(name):
    model, x = make_model(name), make_input(name)
    before = _snapshot(model)
    for method in funcam.METHODS:
        funcam.cam(funcam.split(model), x, [1, 2], method=method)
    sp = funcam.split(model)
    funcam.gradcam(sp, x, [3]).sum().backward()  # differentiable maps: grads land on params, never hooks
    after = _snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    for k in before[0]:
        torch.testing.assert_close(before[0][k], after[0][k], atol=0, rtol=0)
    model.zero_grad(set_to_none=True)  # the test's own backward put them there


def test_frozen_parameters():
    model = timm_model("resnet18").requires_grad_(False)
    x = make_input("resnet18")
    maps = funcam.gradcam(funcam.split(model), x, [1, 2], relu=False)
    assert torch.count_nonzero(maps) > 0 and all(p.grad is None for p in model.parameters())
    assert not maps.requires_grad
