"""State, concurrency and memory (issue 8).

* Chunking never changes the maps: ``chunk_size`` and ``max_memory`` (down to one class per chunk) give the
  unchunked maps bit for bit, on the average-pool fast path, the general vjp path, multi-layer FX cuts, ViT
  token cuts and the input-gradient methods.
* One ``Split`` (or model) used from 4 Python threads at once gives the sequential maps bit for bit, also
  when different methods run side by side (the guided-ReLU mode of one thread must not reach another).
* Repeated calls neither grow the resident memory nor leave tensors behind, and no tensor waits in a
  reference cycle for the garbage collector.
* The model, and torch's global state, are bit-identical after every public entry point, in eval mode and
  in training mode (where each call warns once).

torch's intra-op parallelism is pinned to one thread (autouse fixture below): every reduction then runs in
one fixed order, so Python threads can be compared with sequential calls exactly.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import funcam
from funcam.explain import METHOD_NAMES, explain
from tests.conftest import make_input, make_model, quick_options, record_vmap_chunks, timm_model

ROOT = Path(__file__).resolve().parents[1]

ATTENTION = ("rollout", "grad-rollout", "chefer")
CNN_NAMES = [n for n in METHOD_NAMES if n not in ATTENTION]  # every CAM method + guided ones
VIT_NAMES = [n for n in METHOD_NAMES if not n.startswith("guided")]  # GELU ViTs have no guided rule


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _maps(out):
    """The maps tensor of whatever an entry point returned (CAM, tensor, tuple of per-layer maps)."""
    out = out.maps if isinstance(out, funcam.CAM) else out
    return torch.cat([m.flatten() for m in out]) if isinstance(out, tuple) else out


def _assert_nonzero(t: torch.Tensor, what: str = "") -> None:
    assert torch.isfinite(t).all(), what
    assert bool((t != 0).any()), f"all-zero maps {what}"


# --------------------------------------------------------------------------------------------- chunking

SPLITS = {  # name -> (family, Split builder); the assertion in the test says which engine path each takes
    "fast": ("resnet18", lambda m: funcam.split(m)),
    "general": ("resnet18", lambda m: funcam.split(m)._replace(pooled=None)),
    "fx-two-layers": ("resnet18", lambda m: funcam.split(m, ["layer3", "layer4"])),
    "vit-tokens": ("vit_tiny_patch16_224", lambda m: funcam.split(m)),
}


# every rule on the general (vmapped) path in the fast set; on the other paths three rules (a plain weight, the
# weights from second and third powers, an element-wise product), every rule in the slow set
CHUNK_FAST = {"gradcam", "gradcampp", "layercam"}


@pytest.mark.parametrize("where,method", [
    (w, m) if w == "general" or m in CHUNK_FAST else pytest.param(w, m, marks=pytest.mark.slow)
    for w in sorted(SPLITS) for m in funcam.METHODS])
def test_chunked_maps_equal_unchunked(where, method, monkeypatch):
    family, build = SPLITS[where]
    model, x = make_model(family), make_input(family)
    sp = build(model)
    assert (sp.pooled is not None) == (where == "fast")
    # per-image classes with a repeat, K = 7 (not a multiple of the chunks below)
    classes = torch.tensor([[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 8, 9, 7]])
    with torch.no_grad():
        full = funcam.cam(sp, x, classes, method=method, relu=False, chunk_size=7)
        _assert_nonzero(_maps(full), f"{where} {method}")
        variants = {"chunk_size=1": {"chunk_size": 1}, "chunk_size=3": {"chunk_size": 3},
                    "max_memory=1": {"max_memory": 1}, "max_memory default": {}}
        for name, opts in variants.items():
            with record_vmap_chunks(monkeypatch) as chunks:
                got = funcam.cam(sp, x, classes, method=method, relu=False, **opts)
            if name == "max_memory=1":  # a budget below one class's tensors means one class per chunk
                # (one vmap on the general path; the fast path maps chunk by chunk, one vmap per chunk)
                assert chunks == ([1] * 7 if where == "fast" else [1]), chunks
            # float tolerance: the vmapped matmuls and convolutions take (chunk x B)-row operands, and BLAS / oneDNN
            # block them differently for other row counts (on the ViT's token head everywhere; on CNN cuts with
            # AVX-512 kernels, bit-exact on AVX2); measured at most 8e-7 of the map's largest value over every method
            # (float32 eps is 1.2e-7)
            torch.testing.assert_close(_maps(got), _maps(full), rtol=0, atol=1e-5 * float(_maps(full).abs().max()),
                                       msg=f"{where} {method} {name}")
            assert torch.equal(got.logits, full.logits) and torch.equal(got.classes, full.classes)


INPUT_GRADIENTS = {  # methods on class_vjp: chunk_size only
    "guided-backprop": ("resnet18", lambda m, x, **o: funcam.guided_backprop(m, x, [3, 1, 4, 1, 5], **o)),
    "guided-gradcam": ("resnet18", lambda m, x, **o: funcam.guided_gradcam(m, x, [3, 1, 4, 1, 5], **o)),
    "chefer": ("vit_tiny_patch16_224", lambda m, x, **o: funcam.chefer_relevance(m, x, [3, 1, 4, 1, 5], **o)),
    "grad-rollout": ("vit_tiny_patch16_224", lambda m, x, **o: funcam.grad_rollout(m, x, [3, 1, 4, 1, 5], **o)),
}


@pytest.mark.parametrize("name", sorted(INPUT_GRADIENTS))
def test_chunked_input_gradient_methods_equal_unchunked(name):
    family, fn = INPUT_GRADIENTS[name]
    model, x = make_model(family), make_input(family)
    with torch.no_grad():
        full = fn(model, x)
        _assert_nonzero(full, name)
        for chunk in (1, 2, 5):
            got = fn(model, x, chunk_size=chunk)
            # float tolerance, as for the cuts above: measured at most 6.6e-7 of the largest value
            torch.testing.assert_close(got, full, rtol=0, atol=1e-5 * float(full.abs().max()),
                                       msg=f"{name} chunk_size={chunk}")


# ---------------------------------------------------------------------------------------------- threads

def _cnn_calls() -> dict:
    model = make_model("resnet18")
    fast, general, fx = funcam.split(model), funcam.split(model)._replace(pooled=None), funcam.split(model, "layer3")
    calls = {f"cam-{m}": (lambda x, m=m: funcam.cam(fast, x, [1, 3, 5], method=m).maps) for m in funcam.METHODS}
    calls.update({
        "cam-gradcampp-general": lambda x: funcam.gradcampp(general, x, [1, 3, 5]),
        "cam-gradcam-layer3": lambda x: funcam.gradcam(fx, x, [2, 4]),
        "cam-gradcam-top2": lambda x: funcam.gradcam(fast, x, top_k=2),
        "cam-softmax-callable": lambda x: funcam.gradcam(general, x, lambda lg: lg.softmax(-1)[:, [1, 7]]),
    })
    for name in ("gradcam", "gradcampp", "layercam", "guided-backprop", "guided-gradcam"):
        calls[f"explain-{name}"] = lambda x, n=name: explain(model, x, method=n, classes=[1, 3]).maps
    return calls


def _vit_calls() -> dict:
    model = make_model("vit_tiny_patch16_224")
    sp = funcam.split(model)
    calls = {f"explain-{n}": (lambda x, n=n: explain(model, x, method=n, classes=[1, 3]).maps) for n in ATTENTION}
    calls.update({"cam-gradcam-vit": lambda x: funcam.gradcam(sp, x, [1, 3]),
                  "cam-hirescam-vit": lambda x: funcam.hirescam(sp, x, [1, 3]),
                  "attention_rollout": lambda x: funcam.attention_rollout(model, x)})
    return calls


def _run_in_threads(tasks: list, workers: int = 4) -> list:
    """Run ``tasks`` (functions of nothing) from ``workers`` threads that start together."""
    start = threading.Barrier(workers)

    def run(i_task):
        i, task = i_task
        if i < workers:
            start.wait(timeout=60)  # the first call of every worker begins at the same moment
        return task()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, enumerate(tasks)))


@pytest.mark.parametrize("family", ["resnet18", "vit_tiny_patch16_224"])
def test_one_split_from_four_threads_gives_the_sequential_maps(family):
    calls = _cnn_calls() if family == "resnet18" else _vit_calls()
    xs = [make_input(family, seed=s) for s in range(3)]
    # every call on every input, interleaved so that different methods run side by side (a guided call's
    # ReLU mode next to a Grad-CAM's backward, a ViT relevance next to a rollout)
    jobs = [(name, i) for i in range(len(xs)) for name in calls]
    ref = {job: calls[job[0]](xs[job[1]]).detach() for job in jobs}
    got = _run_in_threads([lambda job=job: calls[job[0]](xs[job[1]]).detach() for job in jobs])
    for job, g in zip(jobs, got):
        _assert_nonzero(ref[job], str(job))
        assert torch.equal(g, ref[job]), f"{job}: threaded maps differ (max abs diff {(g - ref[job]).abs().max()})"


def test_threads_under_no_grad_and_grad_mode_side_by_side():
    # grad mode is thread-local in torch: a no_grad caller must not switch it off for a thread that wants
    # differentiable maps, and both get the sequential maps
    model = make_model("resnet18")
    sp = funcam.split(model)._replace(pooled=None)
    xs = [make_input("resnet18", seed=s) for s in range(8)]

    def call(i):
        if i % 2:
            with torch.no_grad():
                out = funcam.gradcampp(sp, xs[i], [1, 3])
            return out, out.requires_grad
        out = funcam.gradcampp(sp, xs[i], [1, 3])
        return out.detach(), out.requires_grad

    ref = [call(i) for i in range(8)]
    got = _run_in_threads([lambda i=i: call(i) for i in range(8)])
    for i, ((r, r_req), (g, g_req)) in enumerate(zip(ref, got)):
        _assert_nonzero(r)
        assert torch.equal(g, r) and g_req == r_req == (i % 2 == 0), i


@pytest.mark.slow  # the four-thread check of eval mode (test_one_split_from_four_threads...) stays fast
def test_four_threads_in_training_mode_leave_batch_norm_statistics():
    # issue 16: the save / switch-off / restore of track_running_stats interleaved between threads, and a
    # thread that entered while another had switched tracking off saw nothing to restore: the running
    # statistics changed for good. Every entry point, from 4 threads at once, many times over.
    model, x = _cnn()
    model.train()
    before = _snapshot(model)
    sp = funcam.split(model)
    calls = [lambda: funcam.gradcam(sp, x, [1, 3]),
             lambda: funcam.gradcampp(sp._replace(pooled=None), x, [2]),
             lambda: funcam.guided_gradcam(model, x, [1]),
             lambda: explain(model, x, method="layercam", classes=[1, 3]).maps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", funcam.TrainingModeWarning)
        got = _run_in_threads([calls[i % len(calls)] for i in range(48)])
    assert all(torch.isfinite(g).all() and bool((g != 0).any()) for g in got)
    _assert_untouched(before, _snapshot(model), eval_mode=False)
    assert all(m.training for m in model.modules())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ----------------------------------------------------------------------------------------------- memory

def _rss() -> int:
    """Resident set size in bytes, after glibc hands its free lists back (so free != leaked)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _live_tensors() -> int:
    # type(), not isinstance: isinstance on some torch objects in gc's list triggers deprecation warnings
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def _memory_calls() -> dict:
    model, vit = make_model("resnet18"), make_model("vit_tiny_patch16_224")
    x, xv = make_input("resnet18"), make_input("vit_tiny_patch16_224")
    sp = funcam.split(model)
    general = sp._replace(pooled=None)
    return {  # name -> (call, repetitions)
        "gradcam": (lambda: funcam.gradcam(sp, x, [1, 3]), 200),
        "gradcam-no-grad": (lambda: _no_grad(lambda: funcam.gradcam(sp, x, [1, 3])), 200),
        "gradcampp-general": (lambda: funcam.gradcampp(general, x, [1, 3, 5], chunk_size=2), 50),
        "explain-layercam": (lambda: explain(model, x, method="layercam", classes=[1, 3]), 50),
        "guided-gradcam": (lambda: funcam.guided_gradcam(model, x, [1, 3]), 30),
        "explain-chefer": (lambda: explain(vit, xv, method="chefer", classes=[1, 3]), 30),
    }


def _no_grad(fn):
    with torch.no_grad():
        return fn()


@pytest.mark.slow  # a soak test: 30-200 calls each; the fast set keeps the reference-cycle check below
@pytest.mark.parametrize("name", list(_memory_calls()))
def test_repeated_calls_do_not_grow_memory_or_leave_tensors(name):
    call, n = _memory_calls()[name]
    for _ in range(10):  # warm-up: allocator pools, lazily created kernels and caches
        call()
    gc.collect()
    tensors, rss = _live_tensors(), _rss()
    for _ in range(n):
        call()
    gc.collect()
    grown = _rss() - rss
    # Measured on this project's machine: at most 1 MiB over 200 calls. A leak of the smallest per-call
    # tensor worth worrying about, the input x (2 x 3 x 64 x 64 float32 = 96 KiB), would add 19 MiB over 200
    # calls and 2.9 MiB over 30; the smallest feature map of a retained autograd graph (resnet18's last stage,
    # 16 KiB) 3.1 MiB over 200. The slack is 2 MiB plus 16 KiB per call: above the measured noise, below a
    # leaked input. A leak of any Python-visible tensor is caught exactly by the count below.
    slack = 2 * 2**20 + n * 16 * 2**10
    assert grown < slack, f"RSS grew by {grown / 2**20:.2f} MiB over {n} calls of {name}"
    assert _live_tensors() <= tensors, f"{_live_tensors() - tensors} tensors left alive by {n} calls of {name}"


def cyclic_tensors(name: str) -> list:
    """Shapes of the tensors that one call of ``name`` leaves in reference cycles (with the cyclic collector off,
    a dropped result must free every tensor by reference counting alone)."""
    call, _ = _memory_calls()[name]
    call()
    gc.collect()
    gc.disable()
    flags = gc.get_debug()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        call()
        gc.collect()
        return [tuple(o.shape) for o in gc.garbage if issubclass(type(o), torch.Tensor)]
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.enable()


@pytest.fixture(scope="module")
def cycles() -> dict:
    # In a fresh interpreter: once torch.compile has run in a process (test_compile, test_guided, ... in the same
    # pytest worker), torch's own autograd.Function dispatch builds a class per call, and those classes hold
    # tensors in cycles; funcam's calls are measured on their own.
    code = ("import json, torch; torch.set_num_threads(1); from tests.test_state import _memory_calls, cyclic_tensors; "
            "print(json.dumps({n: cyclic_tensors(n) for n in _memory_calls()}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="error"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one fresh interpreter runs every entry point (12 s before the first of them)
@pytest.mark.parametrize("name", list(_memory_calls()))
def test_no_tensor_waits_in_a_reference_cycle(name, cycles):
    # A tensor caught in a cycle (a closure holding the features, say) would stay allocated until a later gc
    # pass, so peak memory would pile up across calls. torch's own transforms do leave small cycles of functions
    # and tuples; only tensors count here.
    cyclic = cycles[name]
    assert not cyclic, f"{len(cyclic)} tensors in reference cycles: {cyclic[:5]}"


def test_results_outside_no_grad_hold_the_graph_and_explain_results_do_not():
    # The documented cost of differentiable maps: funcam.cam outside no_grad returns maps with a graph;
    # funcam.explain runs under no_grad and returns plain tensors (nothing keeps the forward alive).
    model, x = make_model("resnet18"), make_input("resnet18")
    out = funcam.cam(funcam.split(model), x, [1, 3])
    assert out.maps.requires_grad and out.maps.grad_fn is not None
    ex = explain(model, x, method="gradcam", classes=[1, 3])
    assert not ex.maps.requires_grad and not ex.logits.requires_grad and ex.maps.grad_fn is None
    assert torch.equal(ex.maps, out.maps.detach())


# ------------------------------------------------------------------------------------- model untouched

_SCALARS = (bool, int, float, str, type(None))
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")


def _snapshot(model: nn.Module) -> dict:
    """Everything a call could change on the model, and torch's global state around it."""
    tensors = {}
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            tensors[f"{kind}:{name}"] = (id(t), t.detach().clone(), t.dtype, t.device, t.requires_grad, t.grad)
    modules = []
    for name, m in model.named_modules():
        scalars = {k: v for k, v in vars(m).items() if isinstance(v, _SCALARS)}  # training, inplace, eps, ...
        hooks = {h: dict(getattr(m, h, {})) for h in _HOOK_DICTS}
        modules.append((name, id(m), sorted(vars(m)), scalars, hooks, list(m._parameters), list(m._buffers),
                        list(m._modules)))
    from torch.nn.modules import module as nn_module

    global_hooks = {h: dict(getattr(nn_module, h)) for h in dir(nn_module)
                    if h.startswith("_global_") and isinstance(getattr(nn_module, h), dict)}
    return {"tensors": tensors, "modules": modules, "global_hooks": global_hooks,
            "grad_enabled": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
            "rng": torch.random.get_rng_state(), "function_modes": torch._C._len_torch_function_stack(),
            "versions": {k: t._version for k, t in model.state_dict(keep_vars=True).items()}}


def _assert_untouched(before: dict, after: dict, *, eval_mode: bool) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (i, v, dt, dev, req, grad) in before["tensors"].items():
        i2, v2, dt2, dev2, req2, grad2 = after["tensors"][k]
        assert i2 == i, f"{k} was replaced by another tensor"
        assert (dt2, dev2, req2) == (dt, dev, req), f"{k}: dtype/device/requires_grad changed"
        assert torch.equal(v2, v), f"{k} changed value"
        assert grad is None and grad2 is None, f"{k}.grad was set"
    for a, b in zip(before["modules"], after["modules"], strict=True):
        assert a == b, f"module {a[0]!r} changed: {a} != {b}"
    for key in ("global_hooks", "grad_enabled", "inference", "function_modes"):
        assert before[key] == after[key], key
    if eval_mode:
        # nothing random runs in eval mode (training-mode dropout draws from the global generator, as the
        # model's own forward would), and nothing may even write to a parameter or buffer (in training mode,
        # restoring a buffer writes it and bumps its version counter)
        assert torch.equal(before["rng"], after["rng"]), "the global random state was consumed"
        assert before["versions"] == after["versions"], "a parameter or buffer was written in place"


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    return copy.deepcopy(make_model("resnet18")), make_input("resnet18")  # batch norm, ReLU(inplace=True)


def _vit() -> tuple[nn.Module, torch.Tensor]:
    # dropout and drop-path active in training mode
    model = timm_model("vit_tiny_patch16_224", img_size=64, drop_rate=0.1, drop_path_rate=0.1)
    return model, make_input("vit_tiny_patch16_224")


def _split_only(model: nn.Module) -> None:
    funcam.split(model)  # probes the head (the fast-path check) under no_grad


def _up(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(x.shape[0], 2, x.shape[2], x.shape[3], generator=g)


ENTRY_POINTS = {  # name -> (model maker, call(model, x)); every call returns something with maps, or None
    **{f"cam-{m}": (_cnn, lambda mdl, x, m=m: funcam.cam(mdl, x, [1, 2], method=m)) for m in funcam.METHODS},
    **{f"shortcut-{m}-split": (_cnn, lambda mdl, x, m=m: getattr(funcam, m)(funcam.split(mdl), x, [1, 2]))
       for m in ("gradcam", "gradcampp")},
    "cam-general": (_cnn, lambda mdl, x: funcam.cam(funcam.split(mdl)._replace(pooled=None), x, [1, 2])),
    "cam-fx-two-layers": (_cnn, lambda mdl, x: funcam.cam(funcam.split(mdl, ["layer3", "layer4"]), x, [1, 2])),
    "cam-vit": (_vit, lambda mdl, x: funcam.cam(mdl, x, [1, 2], method="gradcampp")),
    **{f"explain-{n}": (_cnn, lambda mdl, x, n=n: explain(mdl, x, method=n, classes=[1, 2], **quick_options(n)))
       for n in CNN_NAMES},
    **{f"explain-{n}-vit": (_vit, lambda mdl, x, n=n: explain(mdl, x, method=n, classes=[1, 2], **quick_options(n)))
       for n in VIT_NAMES},
    "explain-default-top2": (_cnn, lambda mdl, x: explain(mdl, x, top_k=2)),
    "guided_backprop": (_cnn, lambda mdl, x: funcam.guided_backprop(mdl, x, [1, 2])),
    "guided_gradcam": (_cnn, lambda mdl, x: funcam.guided_gradcam(mdl, x, [1, 2])),
    "chefer_relevance": (_vit, lambda mdl, x: funcam.chefer_relevance(mdl, x, [1, 2])),
    "grad_rollout": (_vit, lambda mdl, x: funcam.grad_rollout(mdl, x, [1, 2])),
    "attention_rollout": (_vit, lambda mdl, x: funcam.attention_rollout(mdl, x)),
    "rollout_matrix": (_vit, lambda mdl, x: funcam.rollout_matrix(mdl, x)),
    "block_attentions": (_vit, lambda mdl, x: torch.stack(funcam.block_attentions(mdl, x))),
    "split": (_cnn, lambda mdl, x: _split_only(mdl)),
    "metrics.confidence_change": (_cnn, lambda mdl, x: funcam.metrics.confidence_change(mdl, x, _up(x), [1, 2])
                                  .change),
    "metrics.deletion_insertion": (_cnn, lambda mdl, x: funcam.metrics.deletion_insertion(
        mdl, x, _up(x), [1, 2], steps=4)[0]),
    "metrics.road": (_cnn, lambda mdl, x: funcam.metrics.road(mdl, x, _up(x), [1, 2], percentiles=(20, 80),
                                                              generator=torch.Generator().manual_seed(0))),
    "metrics.confidence_change-vit": (_vit, lambda mdl, x: funcam.metrics.confidence_change(
        mdl, x, _up(x), [1, 2]).change),
}
# Score-CAM and its variants run C masked forwards of the whole model per call (512 for resnet18): in the slow set here,
# their own tests (tests/core/test_perturbation.py) run in the fast one
SLOW_ENTRIES = {f"explain-{m}{s}" for m in ("scorecam", "sscam", "iscam") for s in ("", "-vit")}
# The fast set checks every entry point of the library and, through explain, three Grad-CAM rules, rollout and
# Chefer relevance, Guided Backprop, and one of each later kind (a perturbation CAM, a projection CAM, an input
# attribution over samples, occluded forwards, LRP on the rewritten graph); every other method's explain entry runs
# in the slow set. They share the code paths the representatives take (funcam.cam, the request, the engine's vjp /
# forward loops).
FAST_METHODS = {"gradcam", "gradcampp", "layercam", "rollout", "chefer", "guided-backprop", "ablationcam", "eigencam",
                "integrated-gradients", "occlusion", "attnlrp"}
SLOW_ENTRIES |= {f"explain-{m}{s}" for m in METHOD_NAMES if m not in FAST_METHODS for s in ("", "-vit")}


def _marked(names: list) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ENTRIES else n for n in names]


# Without grad mode only one entry point of each kind in the fast set: grad mode is the stricter check (graphs are
# built and must not reach the model); the slow set runs every entry point both ways.
NO_GRAD_FAST = {"cam-gradcam", "cam-vit", "explain-gradcam", "explain-chefer-vit", "explain-attnlrp",
                "explain-integrated-gradients", "explain-occlusion", "explain-ablationcam", "guided_backprop",
                "attention_rollout", "split", "metrics.road"}


def _modes(names: list) -> list:
    return [pytest.param(n, g, marks=pytest.mark.slow) if (n in SLOW_ENTRIES or (not g and n not in NO_GRAD_FAST))
            else pytest.param(n, g) for n in names for g in (True, False)]


def _few(names: list) -> list:
    """The entry points of ``NO_GRAD_FAST`` in the fast set, the rest in the slow set."""
    return [n if n in NO_GRAD_FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


NO_WARNING = {"split"}  # builds callables and probes the head under no_grad; no maps, no training-mode forward


def _result(out):
    if out is None:
        return None
    if isinstance(out, tuple) and not isinstance(out, funcam.CAM) and hasattr(out, "_fields"):
        out = out[0]  # metrics' named tuples
    return _maps(out).detach()


@pytest.mark.parametrize("name,grad", _modes(sorted(ENTRY_POINTS)))
def test_model_untouched_by_every_entry_point(name, grad):
    make, call = ENTRY_POINTS[name]
    model, x = make()
    before = _snapshot(model)
    with torch.set_grad_enabled(grad):
        out = _result(call(model, x))
    if out is not None:
        assert torch.isfinite(out).all() and bool((out != 0).any()), name
    _assert_untouched(before, _snapshot(model), eval_mode=True)


# guided_gradcam runs guided backprop and Grad-CAM, each an entry point of its own: still one warning
@pytest.mark.parametrize("name", _few([n for n in sorted(ENTRY_POINTS) if n not in NO_WARNING]))
def test_training_mode_warns_once_and_leaves_the_model_bit_identical(name):
    make, call = ENTRY_POINTS[name]
    model, x = make()
    model.train()
    before = _snapshot(model)
    with pytest.warns(funcam.TrainingModeWarning) as record:
        out = _result(call(model, x))
    if out is not None:
        assert torch.isfinite(out).all() and bool((out != 0).any()), name
    # bit-identical: batch-norm running statistics and counters restored, flags (training, track_running_stats)
    # unchanged; the version counters may move (restoring a buffer writes it)
    _assert_untouched(before, _snapshot(model), eval_mode=False)
    assert all(m.training for m in model.modules())
    warned = [w for w in record if issubclass(w.category, funcam.TrainingModeWarning)]
    assert len(warned) == 1, f"{len(warned)} TrainingModeWarnings from one call of {name}"


def test_split_holds_no_copies_of_the_weights():
    # Splits close over the model's own modules: an in-place weight update shows in the next call, as a
    # fresh split of the updated model gives (FX cuts included).
    model, x = _cnn()
    splits = {"default": funcam.split(model), "fx": funcam.split(model, "layer4")}
    with torch.no_grad():
        old = {k: funcam.gradcam(s, x, [1, 2]) for k, s in splits.items()}
        model.fc.weight.mul_(-1)
        model.layer4[1].conv2.weight.add_(0.05)
        for k, s in splits.items():
            new = funcam.cam(s, x, [1, 2], relu=False).maps
            fresh = funcam.cam(funcam.split(model, None if k == "default" else "layer4"), x, [1, 2], relu=False).maps
            _assert_nonzero(fresh)
            assert torch.equal(new, fresh), k
            assert not torch.equal(torch.relu(new), old[k]), k


def test_check_split_in_training_mode_leaves_batch_norm_statistics():
    model, x = _cnn()
    model.train()
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", funcam.TrainingModeWarning)
        funcam.check_split(funcam.split(model), x, model)
    _assert_untouched(before, _snapshot(model), eval_mode=False)


# ------------------------------------------------------------------------------ data-parallel wrappers

@pytest.fixture(scope="module")
def _process_group(tmp_path_factory):
    """A one-process gloo group, so DistributedDataParallel can wrap a CPU model."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# the wrappers are unwrapped once, at the entry (guard.unwrap): a few entry points of each kind in the fast set
DP_FAST = {"cam-gradcam", "cam-vit", "explain-gradcam", "explain-chefer-vit", "explain-attnlrp", "guided_backprop",
           "attention_rollout", "metrics.road"}


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
@pytest.mark.parametrize("name", [n if n in DP_FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(ENTRY_POINTS) if n != "split"])
def test_data_parallel_wrappers_give_the_wrapped_models_maps(name, wrapper, _process_group):
    # pytorch-grad-cam breaks on DataParallel models; funcam explains the wrapped module itself (the wrapper
    # only scatters batches over devices), so every entry point gives the plain model's maps bit for bit.
    make, call = ENTRY_POINTS[name]
    model, x = make()
    wrapped = getattr(nn.parallel, wrapper)(model)
    with torch.no_grad():
        plain = _result(call(model, x))
        via = _result(call(wrapped, x))
    _assert_nonzero(plain, name)
    assert torch.equal(plain, via), name
