"""Grad-CAM from the head's Jacobian in a spatially constant shift (funcam/_src/core/engine.py,
``_shift_jacobian_maps``): with more classes than channels, the weights come from C forward-mode passes instead of
K reverse ones. Pinned in float64 to the per-class path (``chunk_size`` forces it) and to a plain autograd loop,
for the ViT routes (CLS-pooled prefix-only head, average-pooled MLP linearisation), an MLP head and a graph cut,
with class indices and with a score callable."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vgg import VGG
from torch import nn

import funcam
from funcam._src.base import as_features
from tests._oracle import loop_cams
from tests.conftest import make_input, make_model, noised, timm_model


def _models():
    vit = timm_model("vit_tiny_patch16_224", num_classes=250, img_size=32, depth=2)  # C = 192 < K
    vit_avg = timm_model("vit_tiny_patch16_224", num_classes=250, seed=None, img_size=32, depth=2, global_pool="avg")
    # timm's VGG with its ConvMlp head (no pooled fast path), narrowed: C = 32 < K = 100
    vgg = VGG(cfg=[16, "M", 32, "M", 32, "M"], num_classes=100, mlp_ratio=1 / 64)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 40))
    return {"vit": (vit, 32, {}), "vit_avg": (vit_avg, 32, {}), "vgg": (vgg, 64, {}), "graph": (net, 8, {"layer": "1"})}


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shift_jacobian_equals_per_class_path_and_loop(name):
    model, size, kw = MODELS[name]
    model = model.double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sp = funcam.split(model, example=x, **kw) if kw else funcam.split(model)
    n = model(x).shape[1]
    c = as_features(sp.extract(x))[0].maps[0].shape[1]
    assert n > c, "the Jacobian path needs more classes than channels"
    classes = torch.arange(n).flip(0)
    fast = funcam.gradcam(sp, x, classes, relu=False)
    per_class = funcam.gradcam(sp, x, classes, relu=False, chunk_size=n // 3)
    torch.testing.assert_close(fast, per_class, rtol=1e-9, atol=1e-14)
    some = [0, n // 2, n - 1]
    want = loop_cams(sp, x, lambda out: out[:, some], "gradcam")
    torch.testing.assert_close(fast[:, [n - 1 - k for k in some]], want, rtol=1e-9, atol=1e-14)
    assert fast.abs().amax() > 0 and fast.flatten(2).std(-1).min() > 0  # not all zero, not constant


def test_shift_jacobian_with_a_score_callable():
    model, size, kw = MODELS["graph"]
    model = model.double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sp = funcam.split(model, example=x, **kw)

    def scores(out):
        return out.softmax(-1)[:, :30]  # K = 30 > C = 8

    fast = funcam.gradcam(sp, x, scores, relu=False)
    per_class = funcam.gradcam(sp, x, scores, relu=False, chunk_size=7)
    torch.testing.assert_close(fast, per_class, rtol=1e-9, atol=1e-16)
    assert fast.abs().amax() > 0


# --- Swin's norm2 cut: the shifted head of funcam._src.cuts.swin (a (C, C) matrix per image) ---------------------

SWIN = "swin_tiny_patch4_window7_224-narrow"  # C = 32 at the cut, 8x8 tokens
SWIN_CLASSES = 48  # K > C: the Jacobian path


def _swin(num_classes: int = SWIN_CLASSES) -> nn.Module:
    """A float64 copy of the narrow Swin with its zero-initialised biases noised (the cached model stays as it is)."""
    return noised(copy.deepcopy(make_model(SWIN, num_classes=num_classes, dtype=torch.float64))).eval()


def _swin_input(seed: int = 1) -> torch.Tensor:
    return make_input(SWIN, seed=seed, dtype=torch.float64)


def _class_forms(n: int, b: int):
    g = torch.Generator().manual_seed(3)
    per_image = torch.stack([torch.randperm(n, generator=g)[:n - 4] for _ in range(b)])  # (B, K), K = n - 4 > C
    return {"list": (list(range(n))[::-1], {}), "per_image": (per_image, {}), "top_k": (None, {"top_k": n - 6})}


@pytest.mark.parametrize("form", ["list", "per_image", "top_k"])
def test_swin_shifted_head_equals_per_class_path_and_loop(form, monkeypatch):
    model, x = _swin(), _swin_input()
    sp = funcam.split(model)
    assert sp.layers == ("layers.1.blocks.1.norm2",) and sp.shifted is not None
    feats = sp.extract(x)
    c = feats.maps[0].shape[1]
    classes, kw = _class_forms(SWIN_CLASSES, x.shape[0])[form]
    from funcam._src.cuts import swin as shifted_mod

    calls = []
    real = shifted_mod.norm_mlp_jacobian

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(shifted_mod, "norm_mlp_jacobian", spy)
    fast = funcam.gradcam(sp, x, classes, relu=False, **kw)
    assert calls, "the shifted head's (C, C) Jacobian was not used"
    monkeypatch.setattr(shifted_mod, "norm_mlp_jacobian", real)
    k = fast.shape[1]
    assert k > c
    generic = funcam.gradcam(sp._replace(shifted=None), x, classes, relu=False, **kw)  # head(A + t), C jvps
    per_class = funcam.gradcam(sp, x, classes, relu=False, chunk_size=k // 3, **kw)  # the per-class vjp
    scale = float(fast.detach().abs().amax())
    assert scale > 0 and fast.flatten(2).std(-1).min() > 0  # not all zero, not constant
    torch.testing.assert_close(fast, generic, rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(fast, per_class, rtol=1e-9, atol=1e-12 * scale)
    idx = funcam.cam(sp, x, classes, method="gradcam", relu=False, **kw).classes  # (B, K) as resolved
    some = [0, k // 2, k - 1]
    loop = loop_cams(sp, x, lambda out: out.gather(1, idx[:, some]), "gradcam")
    torch.testing.assert_close(fast[:, some], loop, rtol=1e-9, atol=1e-12 * scale)


def test_swin_shifted_head_is_the_head_at_zero_and_costs_no_token_pass_per_direction():
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _swin(), _swin_input()
    sp = funcam.split(model)
    feats = sp.extract(x)
    zero = x.new_zeros(x.shape[0], feats.maps[0].shape[1])
    torch.testing.assert_close(sp.shifted(feats, zero), sp.head(feats), rtol=1e-15, atol=0)
    flops = {}
    for name, run in [("forward", lambda: model(x)),
                      ("shifted", lambda: funcam.gradcam(sp, x, torch.arange(SWIN_CLASSES))),
                      ("generic", lambda: funcam.gradcam(sp._replace(shifted=None), x, torch.arange(SWIN_CLASSES)))]:
        with FlopCounterMode(display=False) as counter:
            run()
        flops[name] = counter.get_total_flops()
    # measured: forward 15.5M, shifted 26.2M, generic 87.4M (C = 32 passes of the MLP over the 2 x 64 tokens)
    assert flops["shifted"] < 2 * flops["forward"] and flops["shifted"] < flops["generic"] / 3, flops


class _ScaledLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass of another form (twice the norm): only the probe can tell."""

    def forward(self, x):
        return 2 * super().forward(x)


def _swin_variant(kind: str) -> nn.Module:
    model = _swin()
    c = model.num_features
    if kind == "rms_norm":
        model.norm = nn.RMSNorm(c, dtype=torch.float64)
    elif kind == "mlp_norm":
        blk = model.layers[-1].blocks[-1]
        blk.mlp.norm = nn.LayerNorm(blk.mlp.fc1.out_features, dtype=torch.float64)
    elif kind == "layernorm_subclass":
        model.norm = _ScaledLayerNorm(c, dtype=torch.float64)
    elif kind == "max_pool":
        model.reset_classifier(SWIN_CLASSES, global_pool="max")
        model.double()
        noised(model)
    elif kind == "identity_norm":
        model.norm = nn.Identity()
    return model.eval()


@pytest.mark.parametrize("kind", ["rms_norm", "mlp_norm", "layernorm_subclass", "max_pool", "identity_norm"])
def test_swin_shifted_head_only_where_its_form_holds(kind):
    model, x = _swin_variant(kind), _swin_input()
    sp = funcam.split(model)
    assert sp.layers == ("layers.1.blocks.1.norm2",)
    assert (sp.shifted is not None) == (kind == "identity_norm"), kind
    n = SWIN_CLASSES
    maps = funcam.gradcam(sp, x, torch.arange(n), relu=False)
    scale = float(maps.detach().abs().amax())
    assert scale > 0
    torch.testing.assert_close(maps, funcam.gradcam(sp, x, torch.arange(n), relu=False, chunk_size=n // 3),
                               rtol=1e-9, atol=1e-12 * scale)
    some = [1, n - 2]
    torch.testing.assert_close(maps[:, some], loop_cams(sp, x, lambda out: out[:, some], "gradcam"),
                               rtol=1e-9, atol=1e-12 * scale)


def test_swin_shifted_head_in_training_mode_runs_the_plain_head(monkeypatch):
    # no random module (drop rates 0), so the maps are those of eval mode; the parts' training flag picks the route
    from funcam._src.cuts import swin as shifted_mod

    model = _swin()
    for m in model.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    x = _swin_input()
    want = funcam.gradcam(funcam.split(model)._replace(shifted=None), x, torch.arange(SWIN_CLASSES), relu=False)
    sp = funcam.split(model.train(), token_cut="norm2")
    assert sp.shifted is not None
    monkeypatch.setattr(shifted_mod, "norm_mlp_jacobian", None)  # not called in training mode
    got = funcam.gradcam(sp, x, torch.arange(SWIN_CLASSES), relu=False)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.detach().abs().amax()))


@pytest.mark.parametrize("norm", ["model", "identity", "no_affine"])
def test_norm_mlp_jacobian_is_the_jacobian_of_the_pooled_norm(norm):
    from funcam._src.cuts.blocks import norm_mlp_jacobian

    model = _swin()
    mlp = model.layers[-1].blocks[-1].mlp
    c = model.num_features
    ln = {"model": model.norm, "identity": nn.Identity(),
          "no_affine": nn.LayerNorm(c, eps=1e-3, elementwise_affine=False, dtype=torch.float64)}[norm]
    g = torch.Generator().manual_seed(4)
    f, t = (torch.randn(2, 6, c, generator=g, dtype=torch.float64) for _ in range(2))

    def pooled(s):  # mean_j norm(t_j + mlp(f_j + s)): (B, C) -> (B, C)
        return ln(t + mlp(f + s[:, None, :])).mean(dim=1)

    jac = torch.func.jacrev(pooled)(f.new_zeros(2, c))  # (B, C, B, C); images do not mix
    want = torch.stack([jac[b, :, b] for b in range(2)])
    got = norm_mlp_jacobian(mlp, ln, f, t + mlp(f))
    assert want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, torch.stack([torch.func.jacfwd(pooled)(f.new_zeros(2, c))[b, :, b]
                                                 for b in range(2)]), rtol=1e-10, atol=1e-14)


@pytest.mark.slow  # a full dynamo trace per route (7-9 s each); the routes' eager maps are compared in the fast set
@pytest.mark.parametrize("name", ["vit", "vit_avg", "swin"])
def test_compiled_callers_take_the_per_class_path_with_the_same_maps(name, monkeypatch):
    """Under torch.compile (fullgraph) the Jacobian route is skipped (torch cannot trace jvp through layer_norm inside
    vmap): the compiled maps equal eager's from the Jacobian route, and the route never ran while compiling."""
    if name == "swin":
        model, x = make_model("swin_tiny_patch4_window7_224-narrow"), make_input("swin_tiny_patch4_window7_224-narrow")
    else:
        model, size, _ = MODELS[name]
        model = model.float().eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    sp = funcam.split(model)
    assert sp.shifted is not None
    classes = torch.arange(model(x).shape[1])  # K > C
    with torch.no_grad():
        eager = funcam.gradcam(sp, x, classes)
        ran = []
        real = funcam._src.core.engine._load_jvp_rules
        monkeypatch.setattr(funcam._src.core.engine, "_load_jvp_rules", lambda: ran.append(1) or real())
        torch._dynamo.reset()
        got = torch.compile(lambda xx: funcam.gradcam(sp, xx, classes), fullgraph=True, backend="aot_eager")(x)
    assert not ran
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    assert eager.abs().amax() > 0


def test_shifted_heads_take_the_jacobian_route_from_c_over_16_classes(monkeypatch):
    """With a shifted head the C passes together cost about a forward, so the route starts at K > n / 16 for n =
    min(C, hw) directions (unit shifts, or the map's own positions when fewer: C = 192, hw = 9 here: K = 2), and
    its maps equal the per-class path's; without one it starts at K > n."""
    from funcam._src.core import engine

    model, size, _ = MODELS["vit"]
    model = model.double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sp = funcam.split(model)
    _, c, h, w = as_features(sp.extract(x))[0].maps[0].shape
    n = min(c, h * w)
    runs = []
    real = engine._load_jvp_rules
    monkeypatch.setattr(engine, "_load_jvp_rules", lambda: runs.append(1) or real())
    for k, route in ((max(n // 16, 1), False), (max(n // 16, 1) + 1, True)):
        runs.clear()
        classes = torch.arange(k) * 3
        got = funcam.gradcam(sp, x, classes, relu=False)
        assert bool(runs) == route, (k, runs)
        torch.testing.assert_close(got, funcam.gradcam(sp, x, classes, relu=False, chunk_size=k), rtol=1e-9, atol=1e-14)
        assert got.abs().amax() > 0
    assert engine.jacobian_pays(c + 1, c, False) and not engine.jacobian_pays(c, c, False)


def _narrow_vgg():
    torch.manual_seed(5)
    return VGG(cfg=[16, "M", 32, "M", 32, "M"], num_classes=100, mlp_ratio=1 / 64).double().eval()


@pytest.mark.parametrize("size", [32, 56, 64])  # a map smaller than fc1's 7x7 kernel (ConvMlp pools it up first),
def test_conv_mlp_shifted_head_is_the_head_of_the_shifted_map(size):  # 7x7 (fc2 as a Linear), 8x8 (fc2 a conv)
    vgg = _narrow_vgg()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    sp = funcam.split(vgg)
    assert sp.shifted is not None
    feats = as_features(sp.extract(x))[0]
    s = torch.randn(2, feats.maps[0].shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = vgg.forward_head(feats.maps[0] + s[:, :, None, None])  # exact for any shift, not only at 0
    torch.testing.assert_close(sp.shifted(feats, s), want, rtol=1e-10, atol=1e-13)
    classes = torch.arange(100).flip(0)  # K = 100 > C / 16
    fast = funcam.gradcam(sp, x, classes, relu=False)
    torch.testing.assert_close(fast, funcam.gradcam(sp, x, classes, relu=False, chunk_size=50), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(fast[:, [99, 0]], loop_cams(sp, x, lambda out: out[:, [0, 99]], "gradcam"),
                               rtol=1e-9, atol=1e-14)
    assert fast.abs().amax() > 0 and fast.flatten(2).std(-1).min() > 0


@pytest.mark.parametrize("kind", ["padded_fc1", "training"])
def test_conv_mlp_shifted_head_only_where_its_form_holds(kind):
    vgg = _narrow_vgg()
    if kind == "padded_fc1":  # border outputs see fewer taps of the kernel: the shift is no longer one product
        vgg.pre_logits.fc1.padding = (1, 1)
    else:
        vgg.train()
    assert funcam.split(vgg).shifted is None
