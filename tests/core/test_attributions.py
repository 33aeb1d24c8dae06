"""Input-gradient attributions (core/attributions.py, core/noise.py, engine.sampled_class_vjp) against captum 0.9
on the same float64 model and inputs (SmoothGrad, VarGrad and GradientShap on the same random draws), batched K
against a per-class loop, chunked against unchunked, compiled against eager."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from captum.attr import GradientShap, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from captum.attr._utils.approximation_methods import approximation_parameters

import funcam
from funcam._src.core.attributions import INTEGRATIONS, integration_rule
from funcam._src.core.noise import gradient_shap_draws
from tests.conftest import make_input, make_model, noised

CLASSES = torch.tensor([[1, 3, 7], [2, 3, 0]])  # per image, K = 3


@pytest.fixture(scope="module")
def model():
    # noised: timm's zero biases make a ReLU ResNet positively homogeneous, and its gradient constant along the
    # ray from 0 to x (Integrated Gradients would then equal Input x Gradient and test nothing more)
    return noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))


@pytest.fixture(scope="module")
def x():
    # 32 px (resnet18 still has a 1x1 last stage): float64 convolutions are slow on CPU
    return make_input("resnet18", dtype=torch.float64)[..., ::2, ::2].contiguous()


def captum_per_class(attribute, x, classes=CLASSES, **kwargs) -> torch.Tensor:
    """captum's attributions (B, K, C, H, W): one call per column of ``classes`` (captum takes one target per
    image and call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns that it sets requires_grad on the input
        return torch.stack([attribute(x.clone(), target=classes[:, k], **kwargs).detach()
                            for k in range(classes.shape[1])], dim=1)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    got, want = got.detach(), want.detach()
    assert bool((want != 0).any()), "all-zero reference"
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rel, f"relative error {err:.2e} > {rel}"


@pytest.mark.parametrize("method", INTEGRATIONS)
@pytest.mark.parametrize("n", [2, 7, 50])
def test_integration_rule_is_captums(method, n):
    steps, alphas = approximation_parameters(method)
    got_a, got_w = integration_rule(method, n)
    np.testing.assert_allclose(got_a, alphas(n), rtol=0, atol=1e-7)  # captum's riemann alphas are float32
    np.testing.assert_allclose(got_w, steps(n), rtol=0, atol=1e-15)


@pytest.mark.parametrize("absolute", [True, False])
def test_saliency_equals_captum(model, x, absolute):
    want = captum_per_class(Saliency(model).attribute, x, abs=absolute)
    assert_rel_close(funcam.saliency(model, x, CLASSES, abs=absolute), want)


def test_input_x_gradient_equals_captum(model, x):
    want = captum_per_class(InputXGradient(model).attribute, x)
    assert_rel_close(funcam.input_x_gradient(model, x, CLASSES), want)


@pytest.mark.parametrize("integration,baselines", [(rule, "none") for rule in INTEGRATIONS]
                         + [("gausslegendre", "scalar"), ("riemann_trapezoid", "tensor")])
def test_integrated_gradients_equals_captum(model, x, integration, baselines):
    g = torch.Generator().manual_seed(3)
    base = {"none": None, "scalar": 0.5, "tensor": torch.randn(1, *x.shape[1:], generator=g, dtype=x.dtype)}[baselines]
    want = captum_per_class(IntegratedGradients(model).attribute, x, baselines=base, n_steps=6, method=integration)
    got = funcam.integrated_gradients(model, x, CLASSES, baselines=base, n_steps=6, integration=integration)
    assert_rel_close(got, want)


def test_integrated_gradients_is_not_input_x_gradient_and_is_complete(x):
    # completeness (Sundararajan et al. 2017, prop. 1): the attributions sum to F(x) - F(x'); a smooth model
    # (ConvNeXt: GELU) and many Gauss-Legendre points make the quadrature error negligible
    model = noised(copy.deepcopy(make_model("convnext_atto", dtype=torch.float64)))
    out = funcam.cam(model, x, CLASSES, method="integrated_gradients", n_steps=16)
    with torch.no_grad():
        diff = (model(x) - model(torch.zeros_like(x))).gather(1, CLASSES)
    torch.testing.assert_close(out.maps.sum(dim=(2, 3, 4)), diff, rtol=1e-4, atol=1e-6 * float(diff.abs().max()))
    assert (out.maps - funcam.input_x_gradient(model, x, CLASSES)).abs().max() > 1e-3 * out.maps.abs().max()


def _noise(x, s, stdevs, seed=5):
    return stdevs * torch.randn((s,) + tuple(x.shape), generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def _shared_normal(monkeypatch, noise):
    """captum's NoiseTunnel draws with torch.normal, rows in (B, S) order: it gets funcam's noise (S, B, ...)."""
    monkeypatch.setattr(torch, "normal", lambda *a, **k: noise.transpose(0, 1).flatten(0, 1).clone())


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("absolute", [True, False])
def test_noise_tunnel_equals_captum_on_the_same_noise(model, x, monkeypatch, nt_type, absolute):
    noise = _noise(x, 4, 0.3)
    _shared_normal(monkeypatch, noise)
    want = captum_per_class(NoiseTunnel(Saliency(model)).attribute, x, nt_type=nt_type, nt_samples=4, stdevs=0.3,
                            abs=absolute)
    got = funcam.cam(model, x, CLASSES, method=nt_type, noise=noise, abs=absolute).maps
    assert_rel_close(got, want)
    # the same noise from a generator: drawn as (S, B, C, H, W) standard normals times stdevs
    again = funcam.cam(model, x, CLASSES, method=nt_type, nt_samples=4, stdevs=0.3, abs=absolute,
                       generator=torch.Generator().manual_seed(5)).maps
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_gradient_shap_equals_captum_on_the_same_draws(model, x, monkeypatch):
    dist = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    b, s = x.shape[0], 4
    which, alpha, noise = gradient_shap_draws(x, 3, s, 0.2, torch.Generator().manual_seed(9))
    # captum draws the baselines (np.random.choice), the noise (torch.normal), then the points (np.random.uniform),
    # every one with rows in (B, S) order
    monkeypatch.setattr(np.random, "choice", lambda m, n: which.T.flatten().numpy())
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: alpha.T.flatten().numpy())
    _shared_normal(monkeypatch, noise)
    want = captum_per_class(GradientShap(model).attribute, x, baselines=dist, n_samples=s, stdevs=0.2)
    got = funcam.gradient_shap(model, x, CLASSES, baselines=dist, n_samples=s, stdevs=0.2,
                               generator=torch.Generator().manual_seed(9))
    assert b == 2
    assert_rel_close(got, want)


def test_a_score_callable_equals_captum_on_softmax(model, x):
    want = captum_per_class(IntegratedGradients(lambda t: model(t).softmax(-1)).attribute, x, n_steps=5)
    got = funcam.cam(model, x, lambda out: out.softmax(-1).gather(1, CLASSES), method="integrated_gradients",
                     n_steps=5)
    assert got.classes is None
    assert_rel_close(got.maps, want)


CALLS = {  # method -> options with fixed randomness
    "saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 5},
    "smoothgrad": {"nt_samples": 3}, "vargrad": {"nt_samples": 3}, "gradient_shap": {"n_samples": 3},
}


def _call(model, x, classes, method, **kw):
    opts = dict(CALLS[method])
    if method in ("smoothgrad", "vargrad", "gradient_shap"):
        opts["generator"] = torch.Generator().manual_seed(0)
    return funcam.cam(model, x, classes, method=method, **opts, **kw)


@pytest.mark.parametrize("method", list(CALLS))
def test_batched_classes_equal_a_per_class_loop(model, x, method):
    with torch.no_grad():
        full = _call(model, x, CLASSES, method)
        assert torch.equal(full.classes, CLASSES)
        for k in range(CLASSES.shape[1]):
            one = _call(model, x, CLASSES[:, k:k + 1], method)
            assert_rel_close(full.maps[:, k:k + 1], one.maps, 1e-12)
            torch.testing.assert_close(one.logits, full.logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["no-grad", "grad"])
def test_chunked_equals_unchunked(model, x, method, grad, monkeypatch):
    # max_memory=1: one sample and one class at a time; chunk_size=2: K in chunks, the samples as memory allows
    with torch.set_grad_enabled(grad):
        full = _call(model, x, CLASSES, method, max_memory=2**40)
        for opts in ({"max_memory": 1}, {"chunk_size": 2}):
            got = _call(model, x, CLASSES, method, **opts)
            assert_rel_close(got.maps, full.maps, 1e-12)
            assert got.maps.requires_grad == grad


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_chunked_maps_differentiate_like_unchunked(method):
    # the chunk checkpoints recompute each backward when the maps are differentiated: same gradients w.r.t. x and
    # the parameters (ConvNeXt: GELU, so second derivatives are not zero)
    model = noised(copy.deepcopy(make_model("convnext_atto", dtype=torch.float64)))
    x = make_input("convnext_atto", dtype=torch.float64)[..., ::2, ::2].contiguous().requires_grad_()
    grads = []
    for opts in ({"max_memory": 2**40}, {"max_memory": 1}):
        maps = _call(model, x, CLASSES, method, **opts).maps
        grads.append(torch.autograd.grad((maps * maps).sum(), (x, model.stem[0].weight)))
    for a, b in zip(*grads):
        assert bool((b != 0).any())
        assert_rel_close(a, b, 1e-10)


def test_vit_integrated_gradients_equals_captum():
    model = noised(copy.deepcopy(make_model("vit_tiny_patch16_224", dtype=torch.float64)))
    x = make_input("vit_tiny_patch16_224", dtype=torch.float64)
    want = captum_per_class(IntegratedGradients(model).attribute, x, n_steps=4)
    assert_rel_close(funcam.integrated_gradients(model, x, CLASSES, n_steps=4), want)


def test_top_k_and_logits_come_from_x_itself(model, x):
    out = funcam.cam(model, x, top_k=2, method="integrated_gradients", n_steps=3)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(out.logits.detach(), logits)
    assert torch.equal(out.classes, logits.topk(2).indices)
    empty = funcam.cam(model, x, [], method="smoothgrad")
    assert empty.maps.shape == (2, 0, 3, 32, 32) and funcam.vargrad(model, x, []).shape == (2, 0, 3, 32, 32)


@pytest.mark.slow  # a full trace of the sampled vjp per method: tests/test_compile.py keeps the engine's fast
@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad", "vargrad"])
def test_fullgraph_aot_eager_equals_eager(model, x, method):
    # the noise passed in: compiled code draws from torch's generator differently from eager
    opts = {"n_steps": 4, "integration": "riemann_middle"} if method == "integrated_gradients" else {
        "noise": _noise(x, 3, 0.5)}
    torch._dynamo.reset()
    fn = torch.compile(lambda t, c: funcam.cam(model, t, c, method=method, **opts).maps, fullgraph=True,
                       backend="aot_eager")
    with torch.no_grad():
        assert_rel_close(fn(x, CLASSES), funcam.cam(model, x, CLASSES, method=method, **opts).maps, 1e-12)


@pytest.mark.parametrize("method,opts,exc,match", [
    ("integrated_gradients", {"integration": "simpson"}, ValueError, "integration must be one of 'gausslegendre'"),
    ("integrated_gradients", {"n_steps": 1, "integration": "riemann_left"}, ValueError,
     r"n_steps must be at least 2 for integration='riemann_left'"),
    ("integrated_gradients", {"n_steps": 0}, ValueError, "n_steps must be a positive int, got 0"),
    ("integrated_gradients", {"baselines": torch.zeros(2, 3, 5, 5)}, ValueError,
     r"baselines must broadcast to x's shape \(2, 3, 32, 32\).*got shape \(2, 3, 5, 5\)"),
    ("integrated_gradients", {"baselines": "black"}, TypeError, "baselines must be None"),
    ("smoothgrad", {"noise": torch.zeros(3, 1, 3, 32, 32)}, ValueError,
     r"noise must have shape \(S, B, C, H, W\) = \(S, 2, 3, 32, 32\), got shape \(3, 1, 3, 32, 32\)"),
    ("smoothgrad", {"noise": torch.zeros(2, 3, 32, 32)}, TypeError, r"noise must be None or a floating tensor"),
    ("vargrad", {"stdevs": -1.0}, ValueError, "stdevs must be a finite number >= 0"),
    ("vargrad", {"generator": 3}, TypeError, "generator must be a torch.Generator or None"),
    ("saliency", {"abs": 1}, TypeError, "abs must be True or False"),
    ("gradient_shap", {"baselines": torch.zeros(3, 3, 8, 8)}, ValueError,
     r"baselines must have shape \(M, C, H, W\) = \(M, 3, 32, 32\)"),
    ("gradient_shap", {"n_samples": 0}, ValueError, "n_samples must be a positive int"),
])
def test_bad_options_name_themselves(model, x, method, opts, exc, match):
    with pytest.raises(exc, match=match):
        funcam.cam(model, x, [1], method=method, **opts)


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad", "vargrad"])
def test_a_batch_equals_its_images_one_by_one(model, x, method):
    noise = _noise(x, 3, 0.4)
    opts = {"n_steps": 4} if method == "integrated_gradients" else {"noise": noise}
    with torch.no_grad():
        full = funcam.cam(model, x, CLASSES, method=method, **opts).maps
        for i in range(x.shape[0]):
            one_opts = opts if method == "integrated_gradients" else {"noise": noise[:, i:i + 1]}
            one = funcam.cam(model, x[i:i + 1], CLASSES[i:i + 1], method=method, **one_opts).maps
            assert_rel_close(one, full[i:i + 1], 1e-10)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_no_classes_gives_empty_maps_and_the_logits(model, x, method):
    # K = 0 on the one-point path (saliency, input x gradient): the K-chunk loop runs no chunk (a regression:
    # a zero chunk step raised inside the engine) and the logits are the model's own
    with torch.no_grad():
        out = funcam.cam(model, x, torch.zeros(2, 0, dtype=torch.long), method=method)
        want = model(x)
    assert out.maps.shape == (2, 0) + tuple(x.shape[1:]) and out.classes.shape == (2, 0)
    assert bool(want.abs().sum() > 0)
    torch.testing.assert_close(out.logits, want, rtol=1e-12, atol=1e-12)
