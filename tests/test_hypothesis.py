"""Property-based tests of the public API (hypothesis): random batch sizes (0 included), class lists of every
form (duplicates, empty, per image, top-k), input sizes that are not multiples of the stride, non-square,
non-contiguous and channels_last inputs, four dtypes, no_grad / inference_mode around the call, parameters
with requires_grad off, every CAM method, and the ViT methods.

Invariants: shapes; finite maps; maps >= 0 after ReLU; logits equal ``model(x)``; each class's map equals a
per-image, per-class ``torch.autograd.grad`` loop (the oracle of tests/test_oracles.py) in float32/float64,
and is close to the float32 map in bfloat16/float16; bad class indices and mixed dtypes raise the documented
errors. The "ci" profile (default, deterministic) keeps the file to a minute or two; ``-m slow`` runs the
same properties with many more examples (``HYPOTHESIS_PROFILE=long`` raises every test's count).
"""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import funcam
from funcam.explain import explain
from tests.conftest import make_model
from tests.test_oracles import oracle_map

NUM_CLASSES = 10
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LONG = settings(max_examples=150, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def cnn(name: str, dtype: torch.dtype, requires_grad: bool) -> torch.nn.Module:
    model = make_model(name, NUM_CLASSES, dtype)
    if not requires_grad:
        model = copy.deepcopy(model).requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=64,
                             depth=3, dynamic_img_size=True).eval()


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "transposed":  # non-contiguous: stored (B, C, W, H), viewed as (B, C, H, W)
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if how == "sliced":  # non-contiguous: every other column of a wider tensor
        wide = torch.zeros(x.shape[:3] + (2 * x.shape[3],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@st.composite
def class_args(draw, b: int) -> dict:
    """Keyword arguments choosing the classes, in every accepted form."""
    form = draw(st.sampled_from(["int", "list", "tensor", "per_image", "top_k", "empty"]))
    ks = st.integers(0, NUM_CLASSES - 1)
    if form == "int":
        return {"classes": draw(ks)}
    if form == "list":  # duplicates allowed
        return {"classes": draw(st.lists(ks, min_size=1, max_size=6))}
    if form == "tensor":
        return {"classes": torch.tensor(draw(st.lists(ks, min_size=1, max_size=6)))}
    if form == "per_image":
        k = draw(st.integers(1, 4))
        return {"classes": torch.tensor(draw(st.lists(st.lists(ks, min_size=k, max_size=k), min_size=b, max_size=b)),
                                        dtype=torch.long).reshape(b, k)}
    if form == "top_k":
        return {"top_k": draw(st.integers(1, NUM_CLASSES))}
    return {"classes": []}


def grad_context(name: str):
    return {"none": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[name]()


def oracle(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor, method: str) -> torch.Tensor:
    """Raw maps (B, K, h, w) by a plain loop: one forward per image, autograd.grad per class (no funcam code)."""
    out = []
    for b in range(x.shape[0]):
        with torch.enable_grad():
            f = model.forward_features(x[b:b + 1]).detach().requires_grad_()
            logits = model.forward_head(f)
            maps = [oracle_map(method, torch.autograd.grad(logits[0, k], f, retain_graph=True)[0][0], f.detach()[0])
                    for k in classes[b].tolist()]
        out.append(torch.stack(maps) if maps else f.new_zeros((0,) + f.shape[2:]))
    return torch.stack(out) if out else x.new_zeros((0, classes.shape[1], 1, 1))


def check_cnn(data) -> None:
    name = data.draw(st.sampled_from(["resnet18", "convnext_atto"]), label="model")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    requires_grad = data.draw(st.booleans(), label="requires_grad")
    model = cnn(name, dtype, requires_grad)
    b = data.draw(st.integers(0, 3), label="B")
    h, w = data.draw(st.integers(33, 72), label="H"), data.draw(st.integers(33, 72), label="W")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x32 = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    x = layout(x32.to(dtype), data.draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]),
                                        label="layout"))
    method = data.draw(st.sampled_from(funcam.METHODS), label="method")
    relu = data.draw(st.booleans(), label="relu")
    chunk = data.draw(st.sampled_from([None, 1, 3]), label="chunk_size")
    kw = data.draw(class_args(b), label="classes")
    ctx = data.draw(st.sampled_from(["none", "no_grad", "inference_mode"]), label="context")

    with grad_context(ctx):
        out = funcam.cam(model, x, method=method, relu=relu, chunk_size=chunk, **kw)
    out = out._replace(maps=out.maps.detach(), logits=out.logits.detach())
    k = out.classes.shape[1]
    fh, fw = model.forward_features(x32[:1].to(dtype)).shape[-2:]
    assert out.maps.shape == (b, k, fh, fw) and out.classes.shape == (b, k) and out.logits.shape == (b, NUM_CLASSES)
    assert out.maps.dtype == dtype
    assert torch.isfinite(out.maps).all()
    if relu:
        assert (out.maps >= 0).all()
    if "top_k" in kw:
        assert torch.equal(out.classes, out.logits.topk(kw["top_k"], dim=1).indices)
    event("empty" if b == 0 or k == 0 else f"compared, {dtype}")
    if b == 0 or k == 0:
        return
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x32.to(dtype)), rtol=1e-2 if dtype.itemsize == 2 else 1e-4,
                                   atol=1e-2 if dtype.itemsize == 2 else 1e-5)
    if dtype in (torch.float32, torch.float64):
        # the oracle in float64, and its own float32 rounding as the yardstick: maps are channel sums that can
        # cancel almost exactly (a LayerNorm head on a 1x1 map gives sum_c g_c A_c = 0 analytically), and then
        # only rounding is left, in funcam and in the oracle alike
        fix = (lambda m: m.clamp_min(0)) if relu else (lambda m: m)
        ref = fix(oracle(cnn(name, torch.float64, True), x32.double(), out.classes, method))
        noise = 0.0 if dtype == torch.float64 else float((fix(oracle(model, x32, out.classes, method)) - ref).abs().max())
        err = float((out.maps.double() - ref).abs().max())
        tol = (1e-9 if dtype == torch.float64 else 2e-4) * float(ref.abs().max()) + 10 * noise + 1e-300
        assert err <= tol, (method, err, tol)
    elif method in ("gradcam", "hirescam"):  # low precision: close to the float32 map of the same model
        ref, terms = low_precision_reference(cnn(name, torch.float32, True), x32, out.classes, method)
        # error relative to the size of the terms summed over channels: maps are sums with heavy cancellation
        # (random-weight heads give maps 1e-6 of their terms), so the map's own scale is no yardstick
        err = float(((out.maps.float() - (ref.clamp_min(0) if relu else ref)).abs() / (terms + 1e-12)).max())
        assert err < (0.05 if dtype == torch.bfloat16 else 0.01), (method, dtype, err)


def low_precision_reference(model, x, classes, method):
    """float32 raw maps (B, K, h, w) and the channel sum of the absolute terms, sum_c |w_c A_c| (or |g_c A_c|)."""
    maps, terms = [], []
    for b in range(x.shape[0]):
        f = model.forward_features(x[b:b + 1]).detach().requires_grad_()
        logits = model.forward_head(f)
        mb, tb = [], []
        for k in classes[b].tolist():
            g = torch.autograd.grad(logits[0, k], f, retain_graph=True)[0][0]
            a = f.detach()[0]
            w = g.mean(dim=(1, 2), keepdim=True) if method == "gradcam" else g
            mb.append((w * a).sum(0))
            tb.append((w * a).abs().sum(0))
        maps.append(torch.stack(mb))
        terms.append(torch.stack(tb))
    return torch.stack(maps), torch.stack(terms)


def check_vit(data) -> None:
    model = vit()
    b = data.draw(st.integers(0, 3), label="B")
    h, w = data.draw(st.sampled_from([(32, 48), (64, 64), (48, 80), (40, 40), (50, 64)]), label="size")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = layout(torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed)),
               data.draw(st.sampled_from(["contiguous", "channels_last", "transposed"]), label="layout"))
    method = data.draw(st.sampled_from(["chefer", "grad-rollout", "rollout", "gradcam", "gradcampp"]), label="method")
    kw = data.draw(class_args(b), label="classes")
    ctx = data.draw(st.sampled_from(["none", "no_grad", "inference_mode"]), label="context")
    event("size error" if h % 16 or w % 16 else "runs")
    if h % 16 or w % 16:  # timm would assert deep inside the patch embedding; funcam names x and the fix
        with pytest.raises(ValueError, match=f"x has size {h}x{w}, not a multiple of the patch size 16x16"):
            explain(model, x, method=method, **kw)
        return
    with grad_context(ctx):
        out = explain(model, x, method=method, **kw)
    out = out._replace(maps=out.maps.detach(), logits=out.logits.detach())
    k = out.classes.shape[1]
    assert out.maps.shape == (b, k, h // 16, w // 16)
    assert torch.isfinite(out.maps).all() and (out.maps >= 0).all()
    event("empty" if b == 0 or k == 0 else "compared")
    if b == 0 or k == 0:
        return
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x), rtol=1e-4, atol=1e-5)
    # batch equals loop: each image alone gives its own maps
    for i in range(b):
        one = explain(model, x[i:i + 1], method=method, classes=out.classes[i:i + 1])
        torch.testing.assert_close(one.maps[0], out.maps[i], rtol=1e-4, atol=1e-6 * float(out.maps.abs().max()))


def check_bad_classes(data) -> None:
    model = cnn("resnet18", torch.float32, True)
    x = torch.randn(2, 3, 40, 40)
    bad = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=NUM_CLASSES)), label="bad")
    good = data.draw(st.lists(st.integers(0, NUM_CLASSES - 1), max_size=3), label="good")
    with pytest.raises(ValueError, match=rf"classes must lie in \[0, {NUM_CLASSES}\)"):
        funcam.gradcam(model, x, good + [bad])
    with pytest.raises(TypeError, match="classes must be"):
        funcam.gradcam(model, x, torch.tensor(good + [0], dtype=torch.float32))
    with pytest.raises(TypeError, match="classes must be"):
        funcam.gradcam(model, x, [True] + good)
    other = data.draw(st.sampled_from([d for d in DTYPES if d != torch.float32]), label="x dtype")
    with pytest.raises(TypeError, match="dtype"):
        funcam.gradcam(model, x.to(other), good or [0])


@given(st.data())
def test_cnn_maps_match_the_loop_oracle(data):
    check_cnn(data)


@given(st.data())
def test_vit_maps_batch_equals_loop(data):
    check_vit(data)


@given(st.data())
def test_bad_classes_and_dtypes_raise(data):
    check_bad_classes(data)


@given(st.data())
def test_postprocess_invariants(data):
    b, k = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    seed = data.draw(st.integers(0, 2**16))
    maps = torch.randn(b, k, h, w, generator=torch.Generator().manual_seed(seed)) * data.draw(st.sampled_from([1e-30, 1.0, 1e30]))
    n = funcam.normalize(maps)
    assert n.shape == maps.shape and torch.isfinite(n).all() and (n >= 0).all() and (n <= 1).all()
    if b and k and h * w > 1:  # per map: the max is 1 (to eps) unless the map's range is below eps
        rng = maps.flatten(2).amax(-1) - maps.flatten(2).amin(-1)
        wide = rng > 1e-3
        torch.testing.assert_close(n.flatten(2).amax(-1)[wide], torch.ones(int(wide.sum())), rtol=0, atol=1e-4)
    size = (data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40)))
    up = funcam.upsample(maps, size)
    assert up.shape == (b, k) + size and torch.isfinite(up).all()
    if b and k:  # bilinear, align_corners=False: values stay within each map's range
        assert (up.flatten(2).amax(-1) <= maps.flatten(2).amax(-1) * (1 + 1e-6) + 1e-6).all()


@pytest.mark.slow
@LONG
@given(st.data())
def test_cnn_long(data):
    check_cnn(data)


@pytest.mark.slow
@LONG
@given(st.data())
def test_vit_long(data):
    check_vit(data)


@pytest.mark.slow
@LONG
@given(st.data())
def test_bad_classes_long(data):
    check_bad_classes(data)
