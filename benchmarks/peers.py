"""funcam side by side with the peers, in one process and one run: time and peak memory for K classes of B images.

    python benchmarks/peers.py                     # the README tables (about 12 min on a 2-thread AMD EPYC VM)
    python benchmarks/peers.py --quick             # a smoke run on a tiny model
    python -m benchmarks.peers --models resnet50 --ks 1,1000 --methods gradcam

Contenders, each computing Grad-CAM (or Grad-CAM++) maps at the feature resolution of the same layer:
- ``loop``: the textbook oracle, one forward and one ``autograd.grad`` per class;
- ``pytorch-grad-cam`` (hooks; one forward + backward per call, maps upsampled to the input with cv2);
- ``captum`` ``LayerGradCam`` (one forward + backward per class; no Grad-CAM++);
- ``torchcam`` (hooks; one forward, then one backward per class with ``retain_graph``);
- ``funcam`` eager, and ``funcam`` under ``torch.compile`` (inductor; steady state, compile time apart).
Then the paths beyond timm's pooled CNN heads (``--paths``: ViT CLS / average-pooled cuts, Swin, torchvision graph
cuts, VGG's MLP heads, a two-layer cut, element-wise, relevance, Guided Backprop beside captum's), each beside the
limit of its kind measured in the same run: one forward, K backward passes of the head from the cut, or K backward
passes of the model (those limits timed over ``--peer-classes`` classes and extrapolated).
Peers whose cost is linear in K are timed over ``--peer-classes`` classes (default 10) and scaled; the table
says so. Times: ``torch.utils.benchmark.Timer.blocked_autorange`` on the process's threads, median and
interquartile range; each model first runs one grad-mode forward and backward (a fresh process's allocator
made the first forwards 25 % slower), and its forward is timed before and after its rows. Peak memory:
the process's resident set size sampled every millisecond during one call, minus the RSS before it.
Output: Markdown tables on stdout, JSON with the machine's metadata (``--json``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
import warnings

import timm
import torch
from torch.utils import benchmark

if __package__ in (None, ""):  # run as a script: make ``funcam`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import funcam  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402

T0 = time.perf_counter()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next call's RSS growth is its own."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_rss():
    """Yields a dict whose ``"peak"`` is the RSS high-water mark above the starting RSS, in bytes."""
    out = {"peak": 0}
    _trim()
    start = _rss()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            out["peak"] = max(out["peak"], _rss() - start)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], _rss() - start)


def measure(fn, *, min_time: float, min_repeats: int = 3) -> dict:
    """Median and IQR of ``fn()``'s wall time over at least ``min_time`` seconds of calls (about
    ``min_repeats`` of them), after one warm-up call, which also gives the peak memory."""
    with peak_rss() as mem:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    if min_repeats == 1 and first > min_time:
        # A peer's call longer than min_time (a loop over classes) warms itself up after its first class: the
        # first call is then the sample, which keeps the whole run within minutes.
        m = benchmark.Measurement(1, [first], "fn()", "")
    else:
        # Timer's own default is one thread, and its timeit() runs two untimed calls before each timed one:
        # blocked_autorange on the process's threads makes one more untimed call, then times calls until
        # min_run_time has passed (one call per block: each takes far longer than the timer's overhead).
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=max(min_time, min_repeats * first))
    return {"median_s": m.median, "iqr_s": m.iqr, "repeats": len(m.times), "peak_mb": mem["peak"] / 2**20}


# --- contenders: each returns a callable computing maps for `classes` ------------------------------------

def _target_layer(model, name: str):
    if name.startswith("vit"):
        return model.blocks[-1].norm1
    if name.startswith("convnext"):
        return model.stages[-1]
    return model.layer4


def loop(model, sp, x, classes, method):
    """One forward and one autograd.grad per class (the tests' oracle)."""
    rule = funcam._src.core.weighted.rule_of(funcam._src.core.methods.TABLE[method].compute).per_class

    def run():
        out = []
        for k in classes.tolist():
            feats, rebuild = funcam._src.core.engine.as_features(sp.extract(x))
            a = feats.maps[0].detach().requires_grad_()
            (g,) = torch.autograd.grad(sp.head(rebuild((a,)))[:, k].sum(), a)
            out.append(torch.relu(rule(g, a.detach())))
        return torch.stack(out, 1)
    return run


def pgc(model, name, x, classes, method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reshape = None
    if name.startswith("vit"):
        g = model.patch_embed.grid_size

        def reshape(t):
            return t[:, model.num_prefix_tokens:].reshape(t.shape[0], g[0], g[1], t.shape[-1]).permute(0, 3, 1, 2)
    cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
    cam = cls(model, target_layers=[_target_layer(model, name)], reshape_transform=reshape)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * x.shape[0]) for k in classes.tolist()]
    return run, cam.activations_and_grads.release


def captum(model, name, x, classes, method):
    if method != "gradcam":
        return None, None
    from captum.attr import LayerGradCam

    lgc = LayerGradCam(model, _target_layer(model, name))
    if name.startswith("vit"):
        return None, None  # LayerGradCam needs a (B, C, h, w) layer output

    def run():
        return [lgc.attribute(x, target=k, relu_attributions=True) for k in classes.tolist()]
    return run, None


def torchcam(model, name, x, classes, method):
    if name.startswith("vit"):
        return None, None
    from torchcam.methods import GradCAM, GradCAMpp

    layer = "stages.3" if name.startswith("convnext") else "layer4"
    cls = GradCAM if method == "gradcam" else GradCAMpp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = cls(model, target_layer=layer, input_shape=tuple(x.shape[1:]))

    def run():
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = model(x)
            ks = classes.tolist()
            return [ext(k, scores, normalized=False, retain_graph=i < len(ks) - 1)[0] for i, k in enumerate(ks)]
    return run, ext.remove_hooks


def funcam_eager(sp, x, classes, method):
    fn = getattr(funcam, method)
    return lambda: fn(sp, x, classes)


def funcam_compiled(sp, x, classes, method):
    fn = getattr(funcam, method)
    compiled = torch.compile(lambda xx: fn(sp, xx, classes), fullgraph=True)
    t0 = time.perf_counter()
    compiled(x)
    return (lambda: compiled(x)), time.perf_counter() - t0


def rollout_fn(model, x):
    from funcam import attention_rollout

    return lambda: attention_rollout(model, x)


# --- the run ---------------------------------------------------------------------------------------------

def run_model(name: str, batch: int, size: int, ks: list[int], methods: list[str], a) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **({"img_size": size} if name.startswith("vit") else {})).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    sp = funcam.split(model)
    settle(model, x)
    rows = []
    peer_cache: dict = {}

    def add(method, k, who, res, scaled_from=None, note=""):
        res = dict(res, model=name, batch=batch, method=method, K=k, who=who, note=note)
        if scaled_from is not None and scaled_from != k:
            res["median_s"] *= k / scaled_from
            res["iqr_s"] *= k / scaled_from
            res["note"] = (note + f" timed over {scaled_from} classes, scaled").strip()
        res["x_forward"] = res["median_s"] / fwd["median_s"]  # provisional: the final forward is set below
        rows.append(res)
        print(f"  [{(time.perf_counter() - T0) / 60:5.1f} min] {name} B={batch} {method} K={k} {who}: "
              f"{res['median_s']:.3f} s ({res['x_forward']:.2f}x fwd)"
              f" peak {res['peak_mb']:.0f} MB {res['note']}", file=sys.stderr, flush=True)

    with torch.no_grad():
        fwd = measure(lambda: model(x), min_time=a.min_time)
    add("forward", 0, "model forward", fwd)
    for method in methods:
        for k in ks:
            classes = torch.arange(k)
            with torch.no_grad():
                add(method, k, "funcam", measure(funcam_eager(sp, x, classes, method), min_time=a.min_time))
            if a.compile and k in a.compile_ks and method in a.compile_methods:
                with torch.no_grad():
                    run, compile_s = funcam_compiled(sp, x, classes, method)
                    add(method, k, "funcam compiled", measure(run, min_time=a.min_time),
                        note=f"compile {compile_s:.0f} s")
            if a.no_peers:
                continue
            # Peers cost the same per class: time min(K, peer_classes) classes once and scale to larger K.
            few = classes[: min(k, a.peer_classes)]
            for who, make in (("autograd loop", None), ("pytorch-grad-cam", pgc), ("captum", captum),
                              ("torchcam", torchcam)):
                key = (who, method, len(few))
                if key not in peer_cache:
                    if make is None:
                        run, release = loop(model, sp, x, few, method), None
                    else:
                        run, release = make(model, name, x, few, method)
                    if run is None:
                        peer_cache[key] = None
                        continue
                    try:
                        peer_cache[key] = measure(run, min_time=a.min_time, min_repeats=1)
                    finally:
                        if release is not None:
                            release()
                if peer_cache[key] is not None:
                    add(method, k, who, dict(peer_cache[key]), scaled_from=len(few))
    if name.startswith("vit") and a.rollout:
        with torch.no_grad():
            add("rollout", 0, "funcam", measure(rollout_fn(model, x), min_time=a.min_time))
    # The forward again, after every row: "one forward" is the faster of the two, so no ratio gains from a
    # forward that happened to run in a slower state of the process.
    with torch.no_grad():
        again = measure(lambda: model(x), min_time=a.min_time)
    first = rows[0]
    first["forward_medians_s"] = [first["median_s"], again["median_s"]]
    if again["median_s"] < first["median_s"]:
        first.update(median_s=again["median_s"], iqr_s=again["iqr_s"], repeats=again["repeats"])
    for r in rows:
        r["x_forward"] = r["median_s"] / first["median_s"]
    return rows


def settle(model, x) -> None:
    """One grad-mode forward and backward, gradients dropped: glibc's allocator then holds the pages that the
    activations need. In a fresh process a resnet50 no_grad forward of 8 images took 1.04 s here, 0.82 s
    after this; without it the first rows of a model are timed in a slower state than the rest."""
    model(x).sum().backward()
    for p in model.parameters():
        p.grad = None


def markdown(rows: list[dict]) -> str:
    out = []
    for (model, batch) in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        sub = [r for r in rows if r["model"] == model and r["batch"] == batch]
        fwd = next(r for r in sub if r["method"] == "forward")
        out.append(f"\n**{model}**, B = {batch}: one forward = {fwd['median_s']:.3f} s "
                   f"(IQR {fwd['iqr_s']:.3f}), peak {fwd['peak_mb']:.0f} MB\n")
        out.append("| method | K | contender | time (s) | x forward | funcam speed-up | peak MB | note |")
        out.append("|---|---:|---|---:|---:|---:|---:|---|")
        for r in sub:
            if r["method"] == "forward":
                continue
            ref = next((q for q in sub if q["method"] == r["method"] and q["K"] == r["K"] and q["who"] == "funcam"), r)
            speed = r["median_s"] / ref["median_s"]
            out.append(f"| {r['method']} | {r['K'] or ''} | {r['who']} | {r['median_s']:.3f} | {r['x_forward']:.2f} | "
                       f"{'' if r['who'] == 'funcam' else f'{speed:.0f}x' if speed >= 10 else f'{speed:.1f}x'} | "
                       f"{r['peak_mb']:.0f} | {r['note']} |")
    return "\n".join(out)


PEERS = ("autograd loop", "pytorch-grad-cam", "captum", "torchcam")


def _find(rows: list[dict], **key) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def summary(rows: list[dict], batch: int) -> str:
    """The README's compact tables: per method, seconds for all K classes of the batch, peers as speed-ups."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] not in ("forward", "rollout")):
        sub = [r for r in rows if r["method"] == method and r["batch"] == batch]
        peers = [p for p in PEERS if any(r["who"] == p for r in sub)]
        compiled = any(r["who"] == "funcam compiled" for r in sub)
        out.append(f"\n{method}, seconds for all K classes of B = {batch} images (x = funcam's speed-up):\n")
        out.append("| model (one forward) | K | funcam | x forward |" + (" compiled |" if compiled else "")
                   + "".join(f" {p} |" for p in peers))
        out.append("|---|---:|---:|---:|" + ("---:|" if compiled else "") + "---:|" * len(peers))
        for model in dict.fromkeys(r["model"] for r in sub):
            fwd = _find(rows, model=model, batch=batch, method="forward")
            for i, k in enumerate(dict.fromkeys(r["K"] for r in sub if r["model"] == model)):
                f = _find(sub, model=model, K=k, who="funcam")
                c = _find(sub, model=model, K=k, who="funcam compiled")
                cells = [f"{model} ({fwd['median_s']:.2f} s)" if i == 0 else "", str(k), f"{f['median_s']:.2f}",
                         f"{f['x_forward']:.2f}"]
                if compiled:
                    cells.append(f"{c['median_s']:.2f}" if c else "")
                for p in peers:
                    r = _find(sub, model=model, K=k, who=p)
                    cells.append(f"{_sec(r['median_s'])} ({_times(r['median_s'] / f['median_s'])})" if r else "n/a")
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _sec(t: float) -> str:
    return f"{t:.2f}" if t < 10 else f"{t:.0f}"


def _times(r: float) -> str:
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def targets(rows: list[dict], batch: int) -> list[dict]:
    """The issue's targets, each with its measured value (whatever of it this run measured)."""
    out = []

    def add(what: str, value: float | None, limit: float, higher: bool, unit: str = "x"):
        if value is not None:
            out.append({"target": what, "measured": value, "limit": limit, "unit": unit,
                        "met": value >= limit if higher else value <= limit})

    def ratio(model, method, k, who):
        f, p = (_find(rows, model=model, batch=batch, method=method, K=k, who=w) for w in ("funcam", who))
        return None if f is None or p is None else p["median_s"] / f["median_s"]

    models = list(dict.fromkeys(r["model"] for r in rows if r["batch"] == batch))
    for model in models:
        vit = model.startswith("vit")
        for method, limit in (("gradcam", 1.5), ("gradcampp", 2.0)):
            if not vit:
                f = _find(rows, model=model, batch=batch, method=method, K=1000, who="funcam")
                add(f"{model} {method} K=1000, x forward <=", f and f["x_forward"], limit, False)
        if not vit:
            add(f"{model} gradcam K=1000, speed-up over pytorch-grad-cam >=", ratio(model, "gradcam", 1000,
                "pytorch-grad-cam"), 1000, True)
            add(f"{model} gradcam K=1000, speed-up over captum >=", ratio(model, "gradcam", 1000, "captum"), 300, True)
            add(f"{model} gradcam K=1, speed-up over captum >=", ratio(model, "gradcam", 1, "captum"), 1.0, True)
            fwd = _find(rows, model=model, batch=batch, method="forward")
            for method in ("gradcam", "gradcampp"):
                f = _find(rows, model=model, batch=batch, method=method, K=1000, who="funcam")
                add(f"{model} {method} K=1000, peak MB above the forward's <=",
                    f and f["peak_mb"] - fwd["peak_mb"], 1536, False, " MB")
        add(f"{model} gradcam K=1, speed-up over pytorch-grad-cam >=", ratio(model, "gradcam", 1, "pytorch-grad-cam"),
            2.0, True)
        if vit:
            f = _find(rows, model=model, batch=batch, method="gradcam", K=100, who="funcam")
            add(f"{model} gradcam K=100, x forward <=", f and f["x_forward"], 2.0, False)
            r = _find(rows, model=model, batch=batch, method="rollout")
            add(f"{model} attention rollout, x forward <=", r and r["x_forward"], 1.2, False)
    return out


def targets_markdown(items: list[dict]) -> str:
    lines = ["| target | limit | measured | met |", "|---|---:|---:|---|"]
    for t in items:
        fmt = (lambda v: f"{v:.0f}") if t["unit"] == " MB" or t["limit"] >= 100 else (lambda v: f"{v:.2f}")
        lines.append(f"| {t['target']} | {fmt(t['limit'])}{t['unit']} | {fmt(t['measured'])}{t['unit']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


# --- the paths beyond timm's pooled CNN heads, each beside the limit of its kind -------------------------------

def _torchvision(name: str):
    import torchvision

    return lambda: getattr(torchvision.models, name)(weights=None)


# name: (what, model factory, split(model, x)); every model random (timm / torchvision), eval, float32
PATHS = {
    "vit-cls": ("timm vit_small, CLS-pooled (norm1 cut)", lambda: timm.create_model("vit_small_patch16_224"),
                lambda m, x: funcam.split(m)),
    "vit-avg": ("timm vit_small, average-pooled (norm2 cut)",
                lambda: timm.create_model("vit_small_patch16_224", global_pool="avg"), lambda m, x: funcam.split(m)),
    "swin": ("timm swin_tiny (norm2 cut)", lambda: timm.create_model("swin_tiny_patch4_window7_224"),
             lambda m, x: funcam.split(m)),
    "tv-resnet50": ("torchvision resnet50, layer4 (graph cut)", _torchvision("resnet50"),
                    lambda m, x: funcam.split(m, "layer4", example=x)),
    "timm-vgg16": ("timm vgg16 (MLP head)", lambda: timm.create_model("vgg16"), lambda m, x: funcam.split(m)),
    "tv-vgg16": ("torchvision vgg16, features (graph cut)", _torchvision("vgg16"),
                 lambda m, x: funcam.split(m, "features", example=x)),
    "tv-resnet50-2": ("torchvision resnet50, layer3 + layer4 (graph cut)", _torchvision("resnet50"),
                      lambda m, x: funcam.split(m, ["layer3", "layer4"], example=x)),
    "resnet50": ("timm resnet50 (pooled head)", lambda: timm.create_model("resnet50"), lambda m, x: funcam.split(m)),
}

# (path, method, K, limit, target): the limit is what the method cannot avoid on that path, measured in the same
# run; the target is the most x limit allowed (for "forward" limits: x forward).
#   forward: one forward of the model (Grad-CAM needs the features, and at best nothing else of the size of a forward)
#   head x K: one forward, then K backward passes of the head from the cut (the maps vary per position)
#   model x K: one forward, then K backward passes of the whole model to the input (relevance, guided)
PATH_ROWS = [
    ("vit-cls", "gradcam", 1, "forward", 1.15), ("vit-cls", "gradcam", 100, "forward", 2.0),
    ("vit-cls", "gradcam", 1000, "forward", 1.5), ("vit-cls", "gradcampp", 100, "head x K", 1.5),
    ("vit-cls", "chefer", 10, "model x K", 1.2), ("vit-cls", "grad_rollout", 10, "model x K", 1.5),
    ("vit-avg", "gradcam", 1, "forward", 1.15), ("vit-avg", "gradcam", 1000, "forward", 4.0),
    ("swin", "gradcam", 1, "forward", 1.15), ("swin", "gradcam", 1000, "forward", 4.0),
    ("tv-resnet50", "gradcam", 1, "forward", 1.15), ("tv-resnet50", "gradcam", 1000, "forward", 1.3),
    ("tv-resnet50", "gradcampp", 1000, "forward", 1.6),
    ("timm-vgg16", "gradcam", 1000, "head x K", 1.5), ("tv-vgg16", "gradcam", 1000, "head x K", 1.5),
    ("tv-resnet50-2", "gradcam", 100, "head x K", 1.5),
    ("resnet50", "elementwise", 1000, "forward", 1.5), ("resnet50", "guided_backprop", 10, "model x K", 1.5),
]


def _backward_limit(forward, n: int):
    """(setup, setup + n backward passes): ``forward() -> (output (B, N), leaves)`` under grad mode, then one
    ``autograd.grad`` of each of n classes to the leaves, the graph kept."""
    def run(k: int):
        def go():
            with torch.enable_grad():
                out, leaves = forward()
                for c in range(k):
                    torch.autograd.grad(out[:, c].sum(), leaves, retain_graph=True, allow_unused=True)
        return go
    return run(0), run(n)


def head_limit(sp, x, n: int):
    """The "head x K" limit's two calls: one extract forward and one head forward with the features as leaves."""
    def forward():
        feats, rebuild = funcam._src.base.as_features(sp.extract(x))
        leaves = tuple(m.detach().requires_grad_() for m in feats.maps)
        return funcam._src.core.engine.logits_of(sp.head(rebuild(leaves))), leaves
    return _backward_limit(forward, n)


def model_limit(model, x, n: int):
    """The "model x K" limit's two calls: one forward of the model with the input as leaf."""
    def forward():
        xx = x.detach().requires_grad_()
        return model(xx), (xx,)
    return _backward_limit(forward, n)


def captum_guided(model, x, n: int):
    from captum.attr import GuidedBackprop

    gb = GuidedBackprop(model)
    return lambda: [gb.attribute(x, target=c) for c in range(n)]


def run_paths(names: list[str], batch: int, size: int, a) -> list[dict]:
    """funcam on each path of ``PATH_ROWS`` whose path is in ``names``, each beside its limit (and for Guided
    Backprop, captum's): rows as ``run_model``'s, with ``limit_s``, ``x_limit`` and ``target`` added."""
    rows = []
    for name in dict.fromkeys(p for p, *_ in PATH_ROWS if p in names):
        what, make, split_of = PATHS[name]
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        sp = split_of(model, x)
        settle(model, x)
        with torch.no_grad():
            fwd = measure(lambda model=model, x=x: model(x), min_time=a.min_time)
        base = dict(model=what, path=name, batch=batch)
        rows.append(dict(fwd, **base, method="forward", K=0, who="model forward", note="", x_forward=1.0))
        limits: dict = {}
        for path, method, k, limit, target in PATH_ROWS:
            if path != name:
                continue
            classes = torch.arange(k)
            fn = getattr(funcam, "chefer_relevance" if method == "chefer" else method)
            if method in ("gradcam", "gradcampp", "elementwise"):
                call = (lambda fn=fn, classes=classes, sp=sp, x=x: fn(sp, x, classes))
            else:
                call = (lambda fn=fn, classes=classes, model=model, x=x: fn(model, x, classes))
            with torch.no_grad():
                res = measure(call, min_time=a.min_time)
            if limit == "forward":
                limit_s, note = fwd["median_s"], ""
            else:
                n = min(k, a.peer_classes)
                if (limit, n) not in limits:
                    setup, full = (head_limit(sp, x, n) if limit == "head x K" else model_limit(model, x, n))
                    # both timed alike (a warm-up call, then at least three): the difference is n backward passes
                    t0 = measure(setup, min_time=a.min_time)["median_s"]
                    tn = measure(full, min_time=a.min_time)["median_s"]
                    limits[(limit, n)] = (t0, (tn - t0) / n)
                t0, per = limits[(limit, n)]
                limit_s = t0 + k * per
                note = f"limit from {n} classes" if n < k else ""
            row = dict(res, **base, method=method, K=k, who="funcam", limit=limit, limit_s=limit_s,
                       x_limit=res["median_s"] / limit_s, target=target, note=note,
                       x_forward=res["median_s"] / fwd["median_s"])
            rows.append(row)
            print(f"  [{(time.perf_counter() - T0) / 60:5.1f} min] {what} {method} K={k}: {res['median_s']:.3f} s "
                  f"({row['x_forward']:.2f}x fwd, {row['x_limit']:.2f}x {limit}) peak {res['peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
            if method == "guided_backprop" and not a.no_peers:
                n = min(k, a.peer_classes)
                peer = measure(captum_guided(model, x, n), min_time=a.min_time, min_repeats=1)
                peer = dict(peer, median_s=peer["median_s"] * k / n, iqr_s=peer["iqr_s"] * k / n)
                rows.append(dict(peer, **base, method=method, K=k, who="captum", limit=limit, limit_s=limit_s,
                                 x_limit=peer["median_s"] / limit_s, target=None,
                                 note=f"timed over {n} classes, scaled" if n < k else "",
                                 x_forward=peer["median_s"] / fwd["median_s"]))
    return rows


def paths_markdown(rows: list[dict]) -> str:
    """One table: each path and method with its time, x forward, its limit and x limit, the target, peak memory."""
    out = ["| path (one forward) | method | K | time (s) | x forward | limit | limit (s) | x limit | target | met |"
           " peak MB | note |", "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if r["method"] == "forward":
            fwd = r
            continue
        who = "" if r["who"] == "funcam" else f" ({r['who']})"
        first = f"{r['model']} ({fwd['median_s']:.2f} s)"
        t = r["target"]
        met = "" if t is None else "yes" if r["x_limit"] <= t else "**no**"
        out.append(f"| {first} | {r['method']}{who} | {r['K']} | {r['median_s']:.3f} | {r['x_forward']:.2f} | "
                   f"{r['limit']} | {r['limit_s']:.3f} | {r['x_limit']:.2f} | {'' if t is None else f'{t:.2f}'} | "
                   f"{met} | {r['peak_mb']:.0f} | {r['note']} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,convnext_tiny,vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ks", default="1,10,100,1000", help="K values for CNNs")
    p.add_argument("--vit-ks", default="1,100")
    p.add_argument("--methods", default="gradcam,gradcampp")
    p.add_argument("--scaling", default="1,8,32", help="batch sizes of the scaling rows (first model, K=1000)")
    p.add_argument("--peer-classes", type=int, default=10)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-ks", default="1000")
    p.add_argument("--compile-methods", default="gradcam,gradcampp",
                   help="methods timed compiled too (comma-separated)")
    p.add_argument("--rollout", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"paths beyond timm's pooled CNN heads, each beside its limit (comma-separated of "
                        f"{', '.join(PATHS)}; '' for none)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="tiny smoke run (resnet18 at 64 px, B=2, K=1,3)")
    p.add_argument("--json", default="benchmarks/peers.json")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.size, a.batch, a.ks, a.vit_ks, a.scaling = "resnet18,vit_tiny_patch16_224", 64, 2, "1,3", "1,3", ""
        a.peer_classes, a.min_time, a.compile, a.paths = 2, 0.05, False, "tv-resnet50,resnet50"
    a.compile_ks = [int(v) for v in a.compile_ks.split(",") if v]
    a.compile_methods = a.compile_methods.split(",")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name in a.models.split(","):
        ks = a.vit_ks if name.startswith("vit") else a.ks
        rows += run_model(name, a.batch, a.size, [int(v) for v in ks.split(",")], a.methods.split(","), a)
    first = a.models.split(",")[0]
    for b in [int(v) for v in a.scaling.split(",") if v]:
        if b == a.batch:
            continue
        scale = argparse.Namespace(**{**vars(a), "compile": False, "no_peers": True, "rollout": False})
        rows += run_model(first, b, a.size, [1000], ["gradcam"], scale)
    names = [v for v in a.paths.split(",") if v]
    if set(names) - set(PATHS):
        p.error(f"--paths: unknown {sorted(set(names) - set(PATHS))}; expected names of {', '.join(PATHS)}")
    paths = run_paths(names, a.batch, a.size, a)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "device": "cpu", "size": a.size,
            "total_s": time.perf_counter() - t0}
    print(f"\n{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, {a.size}x{a.size}, random weights; "
          f"whole run {meta['total_s'] / 60:.1f} min")
    print(markdown(rows))
    print(summary(rows, a.batch))
    goals = targets(rows, a.batch)
    print("\nTargets (issue 5; x forward = funcam's time over one model forward of the same batch):\n")
    print(targets_markdown(goals))
    if paths:
        print(f"\nPaths beyond timm's pooled CNN heads, B = {a.batch} (x limit = time over the limit of its kind; "
              "the target is the most x limit allowed):\n")
        print(paths_markdown(paths))
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": goals, "paths": paths}, f, indent=2)


if __name__ == "__main__":
    main()
