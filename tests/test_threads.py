"""Concurrency and state: one Split used from several threads gives the sequential maps; repeated calls do not
grow memory or leave tensors behind; the model is bit-identical after every public entry point."""
from __future__ import annotations

import copy
import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import funcam
from funcam.explain import explain
from tests.conftest import make_input, make_model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


CNN_CALLS = {
    "gradcam": lambda sp, m, x: funcam.gradcam(sp, x, [1, 3, 5]),
    "gradcampp-general": lambda sp, m, x: funcam.gradcampp(sp._replace(pooled=None), x, [1, 3, 5]),
    "guided-gradcam": lambda sp, m, x: explain(m, x, method="guided-gradcam", classes=[1, 3]).maps,
}
VIT_CALLS = {
    "chefer": lambda sp, m, x: explain(m, x, method="chefer", classes=[1, 3]).maps,
    "rollout": lambda sp, m, x: funcam.attention_rollout(m, x),
    "gradcam": lambda sp, m, x: funcam.gradcam(sp, x, [1, 3]),
}


@pytest.mark.parametrize("family,call", [("resnet18", c) for c in CNN_CALLS] + [("vit_tiny_patch16_224", c) for c in VIT_CALLS])
def test_threads_give_the_sequential_maps(family, call):
    fn = (CNN_CALLS if family == "resnet18" else VIT_CALLS)[call]
    model = make_model(family)
    sp = funcam.split(model)
    xs = [make_input(family, seed=s) for s in range(8)]
    with torch.no_grad():
        ref = [fn(sp, model, x) for x in xs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda x: fn(sp, model, x), xs))
    for r, g in zip(ref, got):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_repeated_calls_do_not_grow_memory_or_leave_tensors():
    model, x = make_model("resnet18"), make_input("resnet18")
    sp = funcam.split(model)

    def calls():
        funcam.gradcam(sp, x, [1, 3])
        funcam.gradcampp(sp._replace(pooled=None), x, [2])
        funcam.guided_backprop(model, x, [1])

    for _ in range(20):  # warm-up: allocator pools, lazy inits
        calls()
    gc.collect()
    tensors = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    rss = _rss_bytes()
    for _ in range(200):
        calls()
    gc.collect()
    grown = _rss_bytes() - rss
    # 200 iterations of ~3 calls: a leak of one 64x64 input per call would be 200*3*98 KB = 59 MB
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 iterations"
    assert sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()) <= tensors


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
              getattr(m, "inplace", None)) for m in model.modules()],
            [(p.requires_grad, p.grad) for p in model.parameters()])


def _assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1]
    assert [r for r, _ in a[2]] == [r for r, _ in b[2]] and all(g is None for _, g in b[2])


def test_model_untouched_by_every_entry_point():
    from funcam.explain import METHOD_NAMES

    cnn, vit = copy.deepcopy(make_model("resnet18")), copy.deepcopy(make_model("vit_tiny_patch16_224"))
    xc, xv = make_input("resnet18"), make_input("vit_tiny_patch16_224")
    for model, x, names in ((cnn, xc, [n for n in METHOD_NAMES if n not in ("rollout", "grad-rollout", "chefer")]),
                            (vit, xv, [n for n in METHOD_NAMES if not n.startswith("guided")])):
        before = _snapshot(model)
        for name in names:
            maps = explain(model, x, method=name, classes=[1, 2]).maps
            assert maps.abs().sum() > 0, name
        up = funcam.upsample(funcam.gradcam(model, x, [1, 2]), x.shape[-2:])
        funcam.metrics.confidence_change(model, x, up, [1, 2])
        funcam.metrics.deletion_insertion(model, x, up, [1, 2], steps=4)
        funcam.metrics.road(model, x, up, [1, 2], percentiles=(20, 80))
        _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam"])
@pytest.mark.parametrize("path", ["fast", "general"])
def test_max_memory_chunking_gives_the_unchunked_maps(method, path):
    model, x = make_model("resnet18"), make_input("resnet18")
    sp = funcam.split(model)
    sp = sp if path == "fast" else sp._replace(pooled=None)
    classes = torch.arange(10)
    with torch.no_grad():
        full = funcam.cam(sp, x, classes, method=method, relu=False, chunk_size=10).maps
        assert full.abs().sum() > 0
        for budget in (1, 100_000, 2**20):  # 1 byte: one class per chunk; 100 kB: 3 general-path classes
            got = funcam.cam(sp, x, classes, method=method, relu=False, max_memory=budget).maps
            torch.testing.assert_close(got, full, rtol=0, atol=0)
