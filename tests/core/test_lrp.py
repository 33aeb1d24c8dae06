"""funcam's LRP against lxt 2.1 (AttnLRP, CP-LRP) and zennit 0.5 (composites with canonizers) on the same models
and inputs in float64; batched classes against one class at a time; conservation from ``lrp_budget``."""
from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import funcam
from funcam._src.core.lrp import LRP_RULES, lrp_budget
from tests._oracle import lxt_efficient, patched
from tests.conftest import lrp, make_input, make_model, noised, record_vmap_chunks

CLASSES = torch.tensor([[3, 0, 7], [5, 5, 1]])  # (B, K) per image, a repeated class included
TOL = 1e-4  # relative to the largest reference value, float64


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach() - want.detach()).abs().max() / want.detach().abs().max())


# --- lxt 2.1 ------------------------------------------------------------------------------------------------------

def grad_x_input(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """lxt's recipe, one class at a time: ``y[:, c].backward()`` (relevance starts at the logit), ``x * x.grad`` summed
    over colour channels; (B, K, H, W)."""
    maps = []
    for k in range(classes.shape[1]):
        xx = x.clone().requires_grad_()
        out = model(xx)
        out = getattr(out, "logits", out)
        out.gather(1, classes[:, k:k + 1]).sum().backward()
        maps.append((xx * xx.grad).sum(dim=1).detach())
    return torch.stack(maps, dim=1)


def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=10)
    return noised(model).double().eval()  # torchvision zero-initialises the head


def hf_vit(attention: str = "eager") -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                    intermediate_size=32, num_labels=10, attn_implementation=attention)
    return ViTForImageClassification(cfg).double().eval()


def lxt_tv_vit(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, rule: str) -> torch.Tensor:
    """lxt's map for torchvision's ViT: its ``cp_LRP`` patch map; for AttnLRP its attention rule (lxt's
    ``divide_gradient`` on query / key by 4 and value by 2, as its ``wrap_attention_forward``) at
    ``nn.MultiheadAttention``, which lxt 2.1 ships for Hugging Face attention only."""
    with lxt_efficient():
        from lxt.efficient.models.vit_torch import cp_LRP
        from lxt.efficient.patches import patch_method
        from lxt.efficient.rules import divide_gradient

        def attn_forward(self, query, key, value, *args, **kwargs):
            return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
                                         *args, **kwargs)

        pm = dict(cp_LRP)
        if rule == "attnlrp":
            pm[nn.MultiheadAttention] = partial(patch_method, attn_forward, keep_original=True)
        with patched(pm):
            return grad_x_input(model, x, classes)


def lxt_hf_vit(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, rule: str) -> torch.Tensor:
    """lxt's map for Hugging Face's ViT (eager attention): lxt's LayerNorm and GELU patches and its attention wrapper
    (``wrap_attention_forward`` / ``cp_wrap_attention_forward``) on ``eager_attention_forward``. lxt's own
    ``patch_attention`` also replaces transformers' ``AttentionInterface`` by a dict, which transformers 5 cannot
    call (``get_interface``); eager attention reads only the wrapped function."""
    import transformers.models.vit.modeling_vit as mv
    from transformers.activations import GELUActivation

    with lxt_efficient():
        from lxt.efficient.patches import (
            cp_wrap_attention_forward,
            layer_norm_forward,
            non_linear_forward,
            patch_method,
            wrap_attention_forward,
        )

        wrap = wrap_attention_forward if rule == "attnlrp" else cp_wrap_attention_forward
        pm = {nn.LayerNorm: partial(patch_method, layer_norm_forward),
              GELUActivation: partial(patch_method, non_linear_forward, keep_original=True)}
        with patched(pm, {(mv, "eager_attention_forward"): wrap(mv.eager_attention_forward)}):
            return grad_x_input(model, x, classes)


@pytest.mark.parametrize("family", ["torchvision", "transformers"])
@pytest.mark.parametrize("rule", ["attnlrp", "cplrp"])
def test_equals_lxt_on_vision_transformers(family, rule):
    model = tv_vit() if family == "torchvision" else hf_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = lrp(model, x, CLASSES, rule=rule)
    want = (lxt_tv_vit if family == "torchvision" else lxt_hf_vit)(model, x, CLASSES, rule)
    assert got.maps.shape == (2, 3, 32, 32)
    assert bool(want.abs().max() > 0)
    assert rel_err(got.maps.detach(), want) <= TOL
    assert nn.LayerNorm.forward is nn.modules.normalization.LayerNorm.forward  # lxt's patches undone
    assert "original_forward" not in vars(nn.MultiheadAttention)


@pytest.mark.parametrize("rule", ["attnlrp", pytest.param("cplrp", marks=pytest.mark.slow)])
def test_fused_attention_gets_the_same_rules(rule):
    """Hugging Face's ViT with its default sdpa attention (one fused op in the graph, rewritten) explains as with
    eager attention (matmuls and softmax in the graph, each by its rule), which lxt patches."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eager = lrp(hf_vit("eager"), x, CLASSES, rule=rule).maps
    torch.testing.assert_close(lrp(hf_vit("sdpa"), x, CLASSES, rule=rule).maps, eager)


# --- zennit 0.5 ---------------------------------------------------------------------------------------------------

def with_statistics(model: nn.Module) -> nn.Module:
    """Batch-norm statistics, affine parameters and biases away from their initial 0 / 1, so that merging them
    and the bias rules are exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=m.bias.dtype))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g, dtype=m.bias.dtype))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    return model


def zennit_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, composite, canonizer) -> torch.Tensor:
    """zennit's relevance (its ``Gradient`` attributor, the output relevance one-hot at the class) per class on a copy
    of the model (its canonizers change the parameters while they are registered), per-channel (B, K, C, H, W)."""
    from zennit.attribution import Gradient

    maps = []
    for k in range(classes.shape[1]):
        one_hot = torch.zeros(x.shape[0], 10, dtype=x.dtype).scatter_(1, classes[:, k:k + 1], 1.0)
        with warnings.catch_warnings(), Gradient(copy.deepcopy(model), composite(canonizer)) as attributor:
            warnings.simplefilter("ignore")  # zennit's full backward hooks warn
            _, rel = attributor(x.clone(), one_hot)
        maps.append(rel)
    return torch.stack(maps, dim=1)


def composite(name: str, x: torch.Tensor):
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat

    if name == "epsilon_gamma_box":
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return lambda c: EpsilonGammaBox(low=lo.expand_as(x), high=hi.expand_as(x), canonizers=[c()])
    cls = {"epsilon_plus": EpsilonPlus, "epsilon_plus_flat": EpsilonPlusFlat,
           "epsilon_alpha2_beta1": EpsilonAlpha2Beta1}[name]
    return lambda c: cls(canonizers=[c()])


def tv_cnn(arch: str) -> nn.Module:
    """torchvision's vgg11_bn (its classifier narrowed from 4096 to 32 hidden units: the same layer types, 100x fewer
    weights) or resnet18, 10 classes, float64, with batch-norm statistics."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    if arch == "vgg11_bn":
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                         nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    return with_statistics(model.double().eval())


SLOW = pytest.mark.slow


@pytest.mark.parametrize("arch, rule", [("vgg11_bn", "epsilon_plus"), ("resnet18", "epsilon_plus"),
                                        pytest.param("vgg11_bn", "epsilon_plus_flat", marks=SLOW)]
                         + [pytest.param("vgg11_bn", r, marks=SLOW) for r in ("epsilon_alpha2_beta1",
                                                                              "epsilon_gamma_box")]
                         + [pytest.param("resnet18", r, marks=SLOW) for r in ("epsilon_plus_flat",
                                                                              "epsilon_alpha2_beta1",
                                                                              "epsilon_gamma_box")])
def test_equals_zennit_composites(arch, rule):
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    model = tv_cnn(arch)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = CLASSES[:, 1:]
    got = lrp(model, x, classes, rule=rule, per_channel=True).maps.detach()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    want = zennit_maps(model, x, classes, composite(rule, x), VGGCanonizer if arch == "vgg11_bn" else ResNetCanonizer)
    assert got.shape == want.shape == (2, 2, 3, 32, 32)
    assert bool(want.abs().max() > 0)
    assert rel_err(got, want) <= TOL
    assert rel_err(got.sum(2), want.sum(2)) <= TOL


# --- batching, chunking, options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["attnlrp", pytest.param("epsilon_gamma_box", marks=SLOW)])
def test_batched_classes_equal_one_class_at_a_time(rule, monkeypatch):
    model = make_model("resnet18", dtype=torch.float64)
    x = make_input("resnet18", dtype=torch.float64)
    out = lrp(model, x, CLASSES, rule=rule)
    assert torch.equal(out.classes, CLASSES)
    loop = torch.stack([lrp(model, x, CLASSES[:, k:k + 1], rule=rule).maps[:, 0] for k in range(3)], dim=1)
    torch.testing.assert_close(out.maps, loop, rtol=1e-10, atol=1e-12)
    with record_vmap_chunks(monkeypatch) as seen:
        chunked = lrp(model, x, CLASSES, rule=rule, chunk_size=1)
    assert seen and set(seen) == {1}  # one chunk of one class per vmap (checkpointed chunks: one vmap each)
    torch.testing.assert_close(chunked.maps, out.maps, rtol=1e-10, atol=1e-12)
    assert bool(out.maps.abs().amax(dim=(2, 3)).min() > 0)
    # the same logits as the model (AttnLRP) or within the merged batch norms' factors (zennit's)
    torch.testing.assert_close(out.logits, model(x), rtol=1e-3 if rule != "attnlrp" else 1e-10, atol=1e-12)


def test_per_channel_sums_to_the_map_and_top_k():
    model = make_model("resnet18", dtype=torch.float64)
    x = make_input("resnet18", dtype=torch.float64)
    full = lrp(model, x, top_k=2, per_channel=True)
    maps = lrp(model, x, top_k=2)
    assert full.maps.shape == (2, 2, 3, 64, 64)
    torch.testing.assert_close(full.maps.sum(2), maps.maps)
    torch.testing.assert_close(maps.classes, model(x).topk(2).indices)


def test_max_memory_chunks_the_classes(monkeypatch):
    model = make_model("resnet18")
    x = make_input("resnet18")
    with record_vmap_chunks(monkeypatch) as seen:
        small = lrp(model, x, list(range(10)), max_memory=1)
    assert seen and set(seen) == {1}  # one chunk of one class per vmap (checkpointed chunks: one vmap each)
    torch.testing.assert_close(small.maps, lrp(model, x, list(range(10))).maps, rtol=1e-5, atol=1e-7)


def test_score_callable_explains_each_column():
    model = make_model("resnet18", dtype=torch.float64)
    x = make_input("resnet18", dtype=torch.float64)
    out = lrp(model, x, lambda y: y[:, [3, 5]] * 2.0)
    assert out.classes is None
    # the relevance at the output is the score's: 2 y, twice the logit's
    torch.testing.assert_close(out.maps, 2.0 * lrp(model, x, [3, 5]).maps)


def test_bad_arguments_name_themselves():
    model = make_model("resnet18")
    x = make_input("resnet18")
    with pytest.raises(ValueError, match="rule must be one of attnlrp, cplrp, epsilon_plus"):
        lrp(model, x, rule="lrp")
    with pytest.raises(TypeError, match="method 'attnlrp' has no option 'low'"):
        lrp(model, x, low=-1.0)
    with pytest.raises(ValueError, match="low and high"):
        lrp(model, x, rule="epsilon_plus", low=-1.0)
    with pytest.raises(ValueError, match="composite must be one of 'epsilon_plus'"):
        funcam.cam(model, x, method="lrp", composite="attnlrp")
    with pytest.raises(ValueError, match="outside"):
        lrp(model, x, rule="epsilon_gamma_box", low=0.0, high=1.0)
    with pytest.raises(TypeError, match="per_channel"):
        lrp(model, x, per_channel=1)
    with pytest.raises(ValueError, match="chunk_size"):
        lrp(model, x, chunk_size=0)
    assert LRP_RULES == ("attnlrp", "cplrp", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
                         "epsilon_gamma_box")


def test_explicit_box_bounds():
    model = make_model("resnet18", dtype=torch.float64)
    x = make_input("resnet18", dtype=torch.float64)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(lrp(model, x, [1], rule="epsilon_gamma_box", low=lo, high=hi).maps,
                               lrp(model, x, [1], rule="epsilon_gamma_box").maps)
    wide = lrp(model, x, [1], rule="epsilon_gamma_box", low=-10.0, high=10.0).maps
    assert rel_err(wide, lrp(model, x, [1], rule="epsilon_gamma_box").maps) > 1e-3


# --- conservation ---------------------------------------------------------------------------------------------------

class Gated(nn.Module):
    """conv, batch norm, ReLU6; conv, SiLU; a squeeze-excitation gate (sigmoid); average pool; linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.se1, self.se2, self.fc = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        h = F.silu(self.c2(F.relu6(self.bn(self.c1(x)))))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(h.mean(dim=(2, 3), keepdim=True)))))
        return self.fc((h * gate).mean(dim=(2, 3)))


@pytest.mark.parametrize("name, rule", [("resnet18", "attnlrp"), ("gated", "attnlrp"), ("resnet18", "epsilon_plus"),
                                        ("gated", "epsilon_plus")])
def test_conservative_rules_conserve_on_cnns(name, rule):
    """ReLU networks with batch norm (timm's resnet18), and one with ReLU6, SiLU and a squeeze-excitation gate: LRP-0
    (AttnLRP; the identity rule at ReLU6's clip and at SiLU, the gate held constant) and z+ lose no relevance but
    what the bias terms absorb (and, under a composite, what the stabilisers 1e-6 take). Alpha-beta is not
    conservative where a neuron's inputs have one sign only."""
    if name == "gated":
        torch.manual_seed(0)
        model, x = with_statistics(Gated().double().eval()), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    else:
        model = noised(copy.deepcopy(make_model(name, dtype=torch.float64)))
        x = make_input(name, dtype=torch.float64)
    b = lrp_budget(model, x, [1, 4], rule=rule)
    tol = 1e-7 if rule == "attnlrp" else 1e-3
    torch.testing.assert_close(b.input + b.bias, b.start, rtol=tol, atol=tol * 1e-2)
    assert bool((b.input - b.start).abs().max() > 1e-6)  # the biases do absorb some
    maps = lrp(model, x, [1, 4], rule=rule).maps
    torch.testing.assert_close(maps.sum(dim=(2, 3)), b.input)


def test_window_attention_and_cplrp_conserve():
    """Swin (shifted windows, relative position bias): refused by the attention relevance, explained here; with the
    attention probabilities constant (CP-LRP) every other rule is conservative."""
    name = "swin_tiny_patch4_window7_224-narrow"
    model = noised(copy.deepcopy(make_model(name, dtype=torch.float64)))
    x = make_input(name, dtype=torch.float64)
    b = lrp_budget(model, x, [2], rule="cplrp")
    torch.testing.assert_close(b.input + b.bias, b.start, rtol=1e-6, atol=1e-10)
    maps = lrp(model, x, [2, 7]).maps
    assert maps.shape == (2, 2, 64, 64) and bool(maps.abs().amax(dim=(2, 3)).min() > 0)


def fused_levit(model: nn.Module) -> nn.Module:
    """A copy of a timm LeViT with each ``LinearNorm`` / ``ConvNorm`` (a layer, then its batch norm) replaced by timm's
    own ``fuse()`` (one linear / conv layer), times the factor 1 / sqrt(1 + eps) that zennit's merge leaves: the
    model zennit's canonizer would explain, with no batch norm left to merge."""
    from timm.models.levit import ConvNorm, LinearNorm

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, (LinearNorm, ConvNorm)):
            layer = mod.fuse().to(mod.bn.weight.dtype)
            with torch.no_grad():
                for p in (layer.weight, layer.bias):
                    p.mul_((1 + mod.bn.eps) ** -0.5)
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, layer)
    return out


@pytest.mark.slow
def test_levit_batch_norms_are_merged_and_relevance_finite():
    """LeViT's ``LinearNorm`` batch-normalises the linear layer's output flattened to rows: merged like a batch norm
    right after its layer. Passed instead, the ratio y / x of every such norm multiplied the relevance and timm's
    levit_128s gave non-finite maps in float32. EpsilonPlus equals its maps on the model with the norms fused by timm;
    CP-LRP conserves."""
    from tests.conftest import make_zoo_model

    model, x = make_zoo_model("timm_levit")
    got = lrp(model, x, [1, 4], rule="epsilon_plus").maps
    assert bool(torch.isfinite(got).all()) and bool(got.abs().amax(dim=(2, 3)).min() > 0)
    want = lrp(fused_levit(model), x, [1, 4], rule="epsilon_plus").maps
    assert rel_err(got, want) <= TOL
    b = lrp_budget(model, x, [1], rule="cplrp")
    torch.testing.assert_close(b.input + b.bias, b.start, rtol=1e-6, atol=1e-10)


def test_model_left_as_it_was():
    model = make_model("vit_tiny_patch16_224")
    x = make_input("vit_tiny_patch16_224")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]
    lrp(model, x, [1], rule="cplrp")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert hooks == [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


def test_compiles_with_fullgraph():
    """After one eager call (the graph capture), ``lrp`` traces whole under ``torch.compile(fullgraph=True)``, equals
    eager, and a second same-shape call does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = lrp(model, x, [1, 4]).maps.detach()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda inp: lrp(model, inp, [1, 4]).maps, fullgraph=True, backend=counter)
    torch.testing.assert_close(fn(x).detach(), want)
    fn(x + 1)
    assert counter.frame_count == 1


@pytest.mark.slow  # float16 convolutions on CPU: about 15 s
def test_float16_keeps_the_forward_exact():
    # the rules' ratios y / z overflow float16 (above 65504) where z is tiny; an infinite ratio times the zero
    # gradient-only term made the rewritten forward NaN and the graph was refused (through() holds it finite)
    m = make_model("convnext_atto")
    x = torch.randn(1, 3, 33, 34, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = funcam.cam(m, x, 0, method="lrp").maps
        got = funcam.cam(copy.deepcopy(m).half(), x.half(), 0, method="lrp").maps.float()
    assert bool(want.abs().amax() > 0) and bool(torch.isfinite(got).all())
    assert float((got - want).abs().amax() / want.abs().amax()) < 0.05


@pytest.mark.parametrize("rule", ["cplrp", pytest.param("attnlrp", marks=pytest.mark.slow)])
def test_an_overflowing_model_is_named_not_explained(rule):
    # the model's own logits overflow at this finite x; the rewritten forward once normalised the overflow away
    # (its written-out variance became inf, the output 0) and returned finite relevance for a model that has none
    m = make_model("vit_tiny_patch16_224")
    x = make_input("vit_tiny_patch16_224")[:1] * 1e30
    with torch.no_grad():
        assert not bool(torch.isfinite(m(x)).all())
        with pytest.raises(FloatingPointError, match=r"non-finite logits for images \[0\]"):
            funcam.cam(m, x, 0, method=rule)
