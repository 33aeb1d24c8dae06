"""What every public entry point promises about its input and the model (funcam/_guard.py).

Each test compares against the same call under ordinary conditions (eval mode, normal tensors, finite input),
so a guard that changed the maps would fail, and asserts the reference maps are not all zero.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import funcam
from funcam.explain import explain
from tests.conftest import make_input, make_model


def _state(model: torch.nn.Module) -> dict:
    return {"tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
            "training": [m.training for m in model.modules()],
            "tracking": [getattr(m, "track_running_stats", None) for m in model.modules()],
            "grads": [p.grad for p in model.parameters()]}


def _same_state(a: dict, b: dict) -> bool:
    return (a["tensors"].keys() == b["tensors"].keys()
            and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
            and a["training"] == b["training"] and a["tracking"] == b["tracking"]
            and all(g is None for g in b["grads"]))


CALLS = {
    "gradcam": lambda m, x: funcam.cam(funcam.split(m), x, [1, 3]).maps,
    "gradcampp-layer3": lambda m, x: funcam.cam(funcam.split(m, "layer3"), x, [1, 3], method="gradcampp").maps,
    "guided-backprop": lambda m, x: funcam.guided_backprop(m, x, [1, 3]),
    "guided-gradcam": lambda m, x: funcam.guided_gradcam(m, x, [1, 3]),
    "explain": lambda m, x: explain(m, x, method="layercam", classes=[1, 3]).maps,
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_training_mode_warns_and_leaves_the_model_bit_identical(call):
    model = copy.deepcopy(make_model("resnet18"))
    x = make_input("resnet18")
    model.train()
    before = _state(model)
    with pytest.warns(funcam.TrainingModeWarning, match="training mode"):
        maps = CALLS[call](model, x)
    assert _same_state(before, _state(model))
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    # batch norm used batch statistics, as the model's own training-mode forward does: the logits agree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", funcam.TrainingModeWarning)
        out = funcam.cam(funcam.split(model), x, [1])
    ref = copy.deepcopy(model)(x)
    torch.testing.assert_close(out.logits, ref)


def test_eval_mode_model_without_random_layers_does_not_warn():
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5))  # training mode, nothing random
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = funcam.gradcam(funcam.split(seq, "1"), torch.randn(2, 3, 9, 9), [0, 4])
    assert maps.abs().sum() > 0


@pytest.mark.parametrize("call", sorted(CALLS))
def test_inference_mode_and_no_grad_give_the_same_maps(call):
    model, x = make_model("resnet18"), make_input("resnet18")
    ref = CALLS[call](model, x)
    assert ref.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(CALLS[call](model, x), ref, rtol=0, atol=0)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor: autograd cannot save it, funcam clones it
        assert xi.is_inference()
        torch.testing.assert_close(CALLS[call](model, xi), ref, rtol=0, atol=0)


def test_vit_entry_points_under_inference_mode():
    model, x = make_model("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224")
    for name in ("chefer", "grad-rollout", "rollout"):
        ref = explain(model, x, method=name, classes=[2]).maps
        with torch.inference_mode():
            got = explain(model, x.clone(), method=name, classes=[2]).maps
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert ref.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_naming_x_and_the_images(bad):
    model, x = make_model("resnet18"), make_input("resnet18", batch=3)
    x[1, 0, 5, 5] = bad
    for fn in (lambda: funcam.gradcam(model, x), lambda: funcam.guided_backprop(model, x),
               lambda: explain(model, x, method="gradcampp")):
        with pytest.raises(ValueError, match=r"x contains NaN or Inf \(1 values, in images \[1\]\)"):
            fn()
    vit = make_model("vit_tiny_patch16_224")
    xv = make_input("vit_tiny_patch16_224")
    xv[0, 0, 0, 0] = bad
    for name in ("chefer", "rollout"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            explain(vit, xv, method=name)


def test_non_finite_output_from_finite_input_raises_floating_point_error():
    # a float16 head that overflows (65504 is float16's largest value) for image 1 only
    def extract(x):
        return x

    def head(a):
        return a.mean(dim=(2, 3)) * 100

    sp = funcam.Split(extract, head)
    x = torch.ones(2, 3, 4, 4, dtype=torch.float16)
    x[1] = 1000
    with pytest.raises(FloatingPointError, match=r"non-finite logits for images \[1\]"):
        funcam.gradcam(sp, x, [0])
    out = funcam.cam(sp, x[:1], [0, 2])  # the finite image alone is fine
    assert torch.isfinite(out.maps).all() and out.maps.abs().sum() > 0


@pytest.mark.parametrize("model_dtype,x_dtype", [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                                 (torch.float64, torch.float32), (torch.bfloat16, torch.float16)])
def test_mixed_dtypes_raise_naming_both(model_dtype, x_dtype):
    model = copy.deepcopy(make_model("resnet18")).to(model_dtype)
    x = make_input("resnet18").to(x_dtype)
    for fn in (lambda: funcam.gradcam(model, x), lambda: funcam.guided_backprop(model, x),
               lambda: explain(model, x, method="gradcam")):
        with pytest.raises(TypeError, match=f"x has dtype {x_dtype} but the model's parameters are {model_dtype}"):
            fn()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_supported_dtypes_agree_with_float32(dtype, tol):
    model32, x32 = make_model("resnet18"), make_input("resnet18")
    model = copy.deepcopy(model32).to(dtype)
    for method in ("gradcam", "gradcampp"):
        ref = funcam.cam(model32, x32, [1, 3], method=method, relu=False).maps
        got = funcam.cam(model, x32.to(dtype), [1, 3], method=method, relu=False).maps
        assert got.dtype == dtype and torch.isfinite(got).all()
        # relative to the map's scale: low-precision rounding, not a different map
        err = (got.double() - ref.double()).abs().max() / ref.abs().max()
        assert err < tol, (method, float(err))


def test_empty_batch_and_empty_classes():
    model, x = make_model("resnet18"), make_input("resnet18")
    full = funcam.cam(model, x, [1, 3])
    h, w = full.maps.shape[-2:]
    out = funcam.cam(model, x[:0], [1, 3])
    assert out.maps.shape == (0, 2, h, w) and out.classes.shape == (0, 2) and out.logits.shape == (0, 10)
    assert funcam.cam(model, x[:0], top_k=3).maps.shape == (0, 3, h, w)
    empty = funcam.cam(model, x, [])
    assert empty.maps.shape == (2, 0, h, w)
    with torch.no_grad():  # K = 0 still runs the forward: the logits are the model's
        torch.testing.assert_close(empty.logits, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full.logits, model(x), rtol=1e-5, atol=1e-5)
    assert full.maps.abs().amax() > 0
    assert funcam.guided_backprop(model, x[:0], [1]).shape == (0, 1) + tuple(x.shape[1:])
    vit, xv = make_model("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224")
    for name in ("chefer", "rollout", "grad-rollout", "gradcam"):
        assert explain(vit, xv[:0], method=name, classes=[2]).maps.shape[:2] == (0, 1)
        assert explain(vit, xv, method=name, classes=[]).maps.shape[:2] == (2, 0)


def test_non_finite_attention_reaches_the_rollout_maps_and_raises():
    # an attention whose scores overflow to inf in the first block: softmax gives NaN, which must not become a map
    vit = copy.deepcopy(make_model("vit_tiny_patch16_224"))
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight.mul_(1e30)
    x = make_input("vit_tiny_patch16_224")
    for fn in (lambda: funcam.attention_rollout(vit, x), lambda: funcam.cam(vit, x, [0], method="rollout"),
               lambda: funcam.rollout_matrix(vit, x)):
        with pytest.raises(FloatingPointError, match=r"non-finite (maps|logits) for images \[0, 1\]"):
            fn()
