"""Guided Backprop and Guided Grad-CAM against captum, pytorch-grad-cam and analytic gradients."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from captum.attr import GuidedBackprop
from pytorch_grad_cam import GuidedBackpropReLUModel
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import funcam
from funcam import guided_backprop, guided_gradcam
from funcam._src.core.engine import DEFAULT_MAX_MEMORY, auto_chunk_size
from funcam._src.core.guided import GUIDED_BYTES_PER_INPUT_BYTE
from tests._oracle import input_grads
from tests.conftest import make_input, make_model, record_vmap_chunks, timm_model, tv_model

CLASSES = torch.tensor([[1, 5, 7], [7, 0, 2], [3, 3, 9]])  # (B, K) per image, a repeated class included


def snapshot(model: nn.Module) -> dict:
    """Everything a hook- or swap-based implementation could leave behind."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "inplace": [(n, m.inplace) for n, m in model.named_modules() if hasattr(m, "inplace")],
        "hooks": [(n, len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
                  for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": model.training,
        "grads": [p.grad for p in model.parameters()],
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    for key in ("modules", "inplace", "hooks", "training"):
        assert before[key] == after[key], key
    assert all(h == (n, 0, 0, 0) for (n, *_), h in zip(before["hooks"], after["hooks"]))
    assert all(g is None for g in after["grads"])
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


def torchvision_resnet18() -> nn.Module:
    return tv_model("resnet18")  # one in-place ReLU module used twice per block


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "tv_resnet18"])
def test_equals_captum_and_pytorch_grad_cam(name):
    if name == "vgg11":  # the ConvMlp head narrowed (4096 -> 256 hidden): the same layers, 16x fewer weights
        model = timm_model("vgg11", mlp_ratio=1 / 16)
    else:
        model = torchvision_resnet18() if name == "tv_resnet18" else make_model(name)
    classes = CLASSES
    b_, k_ = classes.shape
    x = torch.randn(b_, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert any(getattr(m, "inplace", False) for m in model.modules() if isinstance(m, nn.ReLU))
    before = snapshot(model)
    got = guided_backprop(model, x, classes)
    assert_unchanged(before, model)
    assert got.shape == (b_, k_, 3, 64, 64)
    # peers modify the model they get: give them copies (without parameter gradients, which they never read)
    captum = GuidedBackprop(copy.deepcopy(model).requires_grad_(False))
    gcam = GuidedBackpropReLUModel(copy.deepcopy(model).requires_grad_(False), device="cpu")
    for b in range(b_):
        for k, c in enumerate(classes[b].tolist()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # captum warns that it sets requires_grad and hooks
                want = captum.attribute(x[b:b + 1].clone(), target=c)[0]
                want_gc = torch.from_numpy(gcam(x[b:b + 1].clone(), target_category=c)).permute(2, 0, 1)
            assert torch.count_nonzero(want) > 0
            torch.testing.assert_close(got[b, k].detach(), want, atol=1e-8, rtol=1e-5)
            torch.testing.assert_close(got[b, k].detach(), want_gc, atol=1e-8, rtol=1e-5)


def test_batch_equals_loop_and_top_k():
    model, x = make_model("resnet18"), make_input("resnet18", batch=3)
    out = funcam.cam(model, x, top_k=2, chunk_size=1, method="guided_backprop")
    torch.testing.assert_close(out.logits, model(x))
    assert torch.equal(out.classes, model(x).topk(2).indices)
    loop = torch.cat([guided_backprop(model, x[i:i + 1], out.classes[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(out.maps, loop, atol=1e-9, rtol=1e-5)
    probs = guided_backprop(model, x, lambda logits: logits.softmax(-1)[:, :2])
    assert probs.shape == (3, 2, 3, 64, 64) and torch.count_nonzero(probs) > 0


@pytest.mark.parametrize("act", ["relu", "relu_inplace", "relu6_inplace", "tensor_relu_", "hardtanh0"])
def test_analytic_two_layer(act):
    """Linear -> activation -> Linear: the guided gradient is written out by hand:
    d/dx = W1^T [(lo < h < hi) * relu(W2[k])]."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(12, 16), nn.Linear(16, 4)
    acts = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "relu6_inplace": nn.ReLU6(inplace=True),
            "hardtanh0": nn.Hardtanh(0.0, 2.0)}

    class Net(nn.Module):
        def forward(self, x):
            h = lin1(x.flatten(1))
            return lin2(h.relu_() if act == "tensor_relu_" else acts[act](h))

    net = Net().eval()
    hi = {"relu6_inplace": 6.0, "hardtanh0": 2.0}.get(act, float("inf"))
    x = torch.randn(2, 3, 2, 2) * 10
    got = guided_backprop(net, x, [0, 3])
    h = lin1(x.flatten(1)).detach()
    for b in range(2):
        for k, c in enumerate([0, 3]):
            gate = ((h[b] > 0) & (h[b] < hi)).to(x.dtype)
            want = (lin1.weight.T @ (gate * lin2.weight[c].clamp(min=0))).reshape(3, 2, 2)
            torch.testing.assert_close(got[b, k], want.detach())
    if act in ("relu6_inplace", "hardtanh0"):
        assert ((h > 0) & (h < hi)).any() and (h > hi).any()  # both sides of the upper bound are exercised


def test_hardtanh_not_starting_at_zero_keeps_its_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.Hardtanh(), nn.Linear(8, 3))
    x = torch.randn(2, 3, 2, 2)
    got = guided_backprop(net, x, [1])
    # hand-written: ReLU guided, Hardtanh(-1, 1) ordinary
    h1 = net[1](x.flatten(1))
    h2 = net[3](net[2](h1))
    g2 = net[5].weight[1].expand(2, -1) * ((h2 > -1) & (h2 < 1))
    g1 = (g2 @ net[3].weight).clamp(min=0) * (h1 > 0)
    torch.testing.assert_close(got[:, 0], (g1 @ net[1].weight).reshape(2, 3, 2, 2).detach())


def test_relu_free_model_raises():
    vit, x = make_model("vit_tiny_patch16_224"), make_input("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="guided backprop needs ReLU activations.*VisionTransformer"):
        guided_backprop(vit, x, [1])
    with pytest.raises(ValueError, match="classes must lie in"):
        guided_backprop(make_model("resnet18"), make_input("resnet18"), [10])


def test_guided_gradcam_is_product():
    model, x = make_model("resnet18"), make_input("resnet18", batch=3)
    out = funcam.cam(funcam.split(model), x, top_k=2, method="guided_gradcam")
    gb = guided_backprop(model, x, out.classes)
    cam = funcam.upsample(funcam.gradcam(funcam.split(model), x, out.classes), (64, 64))
    want = gb * cam.unsqueeze(2)
    assert torch.count_nonzero(want) > 0
    torch.testing.assert_close(out.maps, want, atol=1e-10, rtol=1e-5)
    layer = guided_gradcam(model, x, CLASSES, layer="layer3")
    cam3 = funcam.upsample(funcam.gradcam(funcam.split(model, "layer3"), x, CLASSES), (64, 64))
    torch.testing.assert_close(layer, guided_backprop(model, x, CLASSES) * cam3.unsqueeze(2), atol=1e-10, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("which", ["guided_backprop", "guided_gradcam"])
@pytest.mark.parametrize("k", [pytest.param(3, marks=pytest.mark.slow), 4, pytest.param(5, marks=pytest.mark.slow)])
def test_max_memory_chunks_equal_unchunked(which, k, monkeypatch):
    """max_memory picks the chunk size of the guided vmap (recorded at the engine); every budget gives the
    chunk_size=K maps. Guided Grad-CAM's second vmap is Grad-CAM's on the average-pool fast path (one per chunk)."""
    model, x = make_model("resnet18", dtype=torch.float64), make_input("resnet18", dtype=torch.float64)
    classes = torch.tensor([[1, 5, 7, 0, 9][:k], [7, 0, 2, 2, 3][:k]])  # per image, a repeat in the second
    fn = {"guided_backprop": guided_backprop, "guided_gradcam": guided_gradcam}[which]
    per = GUIDED_BYTES_PER_INPUT_BYTE * x.numel() * 8  # 64 bytes per float64 input byte: 12.6 MB at (2, 3, 64, 64)
    with torch.no_grad():
        full = fn(model, x, classes, chunk_size=k)
        assert torch.count_nonzero(full) > 0
        for budget, want in ((1, 1), (2 * per + per // 2, 2), (k * per, None), (None, None)):
            with record_vmap_chunks(monkeypatch) as chunks:
                got = fn(model, x, classes, max_memory=budget)
            # Grad-CAM's (B, C) gradients are small: one class per chunk only below one class's worth
            cams = ([1] * k if budget == 1 else [k]) if which == "guided_gradcam" else []
            assert chunks == [want] + cams, (budget, chunks)
            torch.testing.assert_close(got, full, rtol=0, atol=1e-12 * float(full.abs().max()), msg=str(budget))
        with record_vmap_chunks(monkeypatch) as chunks:
            cam = funcam.cam(funcam.split(model), x, classes, method=which, chunk_size=k, max_memory=1)
        assert chunks[0] == k and torch.equal(cam.maps, full)  # an explicit chunk_size wins over the budget
    # resnet18 at 224, B = 2 (77 MB a class, over half the default budget): the default runs the floor, one
    # backward per class
    assert 2 * GUIDED_BYTES_PER_INPUT_BYTE * 2 * 3 * 224 * 224 * 4 > DEFAULT_MAX_MEMORY
    assert auto_chunk_size(GUIDED_BYTES_PER_INPUT_BYTE * 2 * 3 * 224 * 224 * 4, 100, None) == 1


# guided_gradcam compiles guided_backprop inside it (fast set); guided_backprop alone runs in the slow set
@pytest.mark.parametrize("which", [pytest.param("guided_backprop", marks=pytest.mark.slow), "guided_gradcam"])
@pytest.mark.slow  # inductor-free but a full dynamo trace per method; test_compile keeps the engine's
def test_fullgraph_compile_no_recompile(which):
    model = make_model("resnet18")
    fn = {"guided_backprop": guided_backprop, "guided_gradcam": guided_gradcam}[which]
    classes = torch.tensor([1, 4])
    before = snapshot(model)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: fn(model, x, classes), fullgraph=True, backend=counter)
    for seed in (0, 1):
        x = make_input("resnet18", seed=seed)
        want = fn(model, x, classes)
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(compiled(x), want, atol=1e-9, rtol=1e-5)
    assert counter.frame_count == 1, "a second call with the same shapes recompiled"
    assert_unchanged(before, model)


def test_compiled_relu_free_model_gives_plain_gradient():
    """The documented compile limitation: the ReLU-free check runs in eager only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 3, 2, 2)
    torch._dynamo.reset()
    got = torch.compile(lambda x: guided_backprop(net, x, [1]), fullgraph=True, backend="aot_eager")(x)
    want = input_grads(net, x, lambda out: out[:, [1]])[:, 0]
    torch.testing.assert_close(got[:, 0], want)
