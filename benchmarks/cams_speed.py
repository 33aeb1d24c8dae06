"""The perturbation and projection CAMs (issue 25) side by side with the peers, in one process and one run.

    python benchmarks/cams_speed.py                 # resnet18 at 224 px, 1000 classes, every row
    python benchmarks/cams_speed.py --size 64       # the same at 64 px (Score-CAM's 512 masked forwards are cheaper)
    python benchmarks/cams_speed.py --methods ablationcam,eigencam --no-peers    # the rows timed against a forward
    python benchmarks/cams_speed.py --quick         # a smoke run (resnet18 at 32 px)

What is timed, each row the median of ``measure`` (benchmarks/peers.py: blocked_autorange after a warm-up call;
a call longer than ``--min-time`` is its own sample), B images, random weights, maps at the same layer:

- Score-CAM: funcam for K = 1 and K = N (all classes: the C masked forwards serve every class), beside
  pytorch-grad-cam's ``ScoreCAM`` and torchcam's ``ScoreCAM``, which run the C masked forwards once per class: they are
  timed over ``--peer-classes`` classes and extrapolated linearly to N (the table says so).
- Ablation-CAM on the pooled head (the default cut: closed form) for K = N beside one forward of the model, and on a
  head that is re-run (``layer3``: the last stage, pooling and the classifier) for K = 10 beside pytorch-grad-cam's
  ``AblationCAM`` (a full forward per channel and class; timed over ``--peer-classes`` classes, extrapolated).
- Eigen-CAM (class-agnostic) beside one forward and pytorch-grad-cam's ``EigenCAM``; EigenGrad-CAM, Finer-CAM,
  FullGrad and ShapleyCAM for K = 10 beside pytorch-grad-cam's (one call per class; timed over ``--peer-classes``
  classes, extrapolated).
funcam runs under ``torch.no_grad()`` where the method needs no gradient (as ``funcam.explain`` does), the forward too.

Output: a Markdown table (time, time per class, ratio peer / funcam: a loss where it is below 1), the targets of
issue 25, JSON with the machine's metadata (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import timm
import torch

if __package__ in (None, ""):  # run as a script: make ``funcam`` and ``benchmarks`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import funcam  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402
from benchmarks.peers import measure  # noqa: E402

NO_GRAD = ("scorecam", "ablationcam", "eigencam", "forward")
T0 = time.perf_counter()


def _quiet(fn):
    """``fn`` with the peers' warnings and progress bars out of the output."""
    def run():
        with warnings.catch_warnings(), open(os.devnull, "w") as null:
            warnings.simplefilter("ignore")
            err, sys.stderr = sys.stderr, null
            try:
                return fn()
            finally:
                sys.stderr = err
    return run


def pgc_call(cls, model, layer, x, classes, **kw):
    """pytorch-grad-cam's ``cls`` once per class (the same class for every image); and what releases its hooks."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cam = cls(model, target_layers=[layer] if layer is not None else [], **kw)
    run = _quiet(lambda: [cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * x.shape[0]) for k in classes])
    return run, cam.activations_and_grads.release


def pgc_finer(model, layer, x, classes):
    from pytorch_grad_cam import FinerCAM
    cam = FinerCAM(model, [layer])
    run = _quiet(lambda: [cam(input_tensor=x, targets=None, target_idx=k) for k in classes])
    return run, cam.base_cam.activations_and_grads.release


def torchcam_score(model, x, classes):
    from torchcam.methods import ScoreCAM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = ScoreCAM(model, "layer4", input_shape=tuple(x.shape[1:]))

    def run():
        out = []
        for k in classes:
            scores = model(x)
            out.append(ext(k, scores, normalized=False)[0])
        return out
    return _quiet(run), ext.remove_hooks


def funcam_call(sp, x, classes, method, **kw):
    def run():
        if method in NO_GRAD:
            with torch.no_grad():
                return funcam.cam(sp, x, classes, method=method, **kw).maps
        return funcam.cam(sp, x, classes, method=method, **kw).maps
    return run


def rows_for(model, x, n: int, a) -> list[dict]:
    """Every row of the module docstring."""
    import pytorch_grad_cam as p
    rows: list[dict] = []
    peer_k = list(range(a.peer_classes))
    sp, sp3 = funcam.split(model), funcam.split(model, "layer3")
    funcam.gradcam(sp3, x, [0])  # the graph route captures and checks on first use: not part of any row's time

    def add(method, k, who, fn, *, timed_k=None, layer="layer4"):
        fn, release = fn if isinstance(fn, tuple) else (fn, None)
        # one sample when a call is longer than min_time (a Score-CAM call: C forwards), else blocked_autorange
        r = measure(fn, min_time=a.min_time, min_repeats=1)
        if release is not None:
            release()  # the peer's hooks must not run inside the next contender's forwards
        per = r["median_s"] / (timed_k or k) if k else r["median_s"]
        est = per * k if timed_k is not None else r["median_s"]
        rows.append({"method": method, "K": k, "who": who, "layer": layer, "median_s": est, "measured_s": r["median_s"],
                     "timed_classes": timed_k or k, "extrapolated": timed_k is not None, "peak_mb": r["peak_mb"]})
        print(f"[{time.perf_counter() - T0:7.1f}s] {method:12s} K={k:<5d} {who:18s} {est:9.3f} s"
              + (f" (timed on {timed_k} classes)" if timed_k is not None else ""), flush=True)

    def fwd():
        with torch.no_grad():
            return model(x)
    add("forward", 0, "model", fwd, layer="")
    if "scorecam" in a.methods:  # the C masked forwards serve every class
        add("scorecam", 1, "funcam", funcam_call(sp, x, [1], "scorecam"))
        add("scorecam", n, "funcam", funcam_call(sp, x, torch.arange(n), "scorecam"))
        if not a.no_peers:
            add("scorecam", n, "pytorch-grad-cam", pgc_call(p.ScoreCAM, model, model.layer4, x, peer_k),
                timed_k=len(peer_k))
            add("scorecam", n, "torchcam", torchcam_score(model, x, peer_k), timed_k=len(peer_k))
    if "ablationcam" in a.methods:  # the pooled closed form at K = N; the re-run head at K = 10
        add("ablationcam", n, "funcam", funcam_call(sp, x, torch.arange(n), "ablationcam"))
        add("ablationcam", 10, "funcam", funcam_call(sp3, x, torch.arange(10), "ablationcam"), layer="layer3")
        if not a.no_peers:
            add("ablationcam", 10, "pytorch-grad-cam", pgc_call(p.AblationCAM, model, model.layer3, x, peer_k),
                timed_k=len(peer_k), layer="layer3")
    if "eigencam" in a.methods:  # one forward and one batched SVD
        add("eigencam", 1, "funcam", funcam_call(sp, x, [1], "eigencam"))
        if not a.no_peers:
            add("eigencam", 1, "pytorch-grad-cam", pgc_call(p.EigenCAM, model, model.layer4, x, [1]))
    gradients = (("eigengradcam", p.EigenGradCAM), ("finercam", None), ("fullgrad", p.FullGrad),
                 ("shapleycam", p.ShapleyCAM))
    for method, peer in (gradients if "gradients" in a.methods else ()):  # at K = 10
        target = model if method == "fullgrad" else sp
        add(method, 10, "funcam", funcam_call(target, x, torch.arange(10), method))
        if a.no_peers:
            continue
        fn = (pgc_finer(model, model.layer4, x, peer_k) if peer is None else
              pgc_call(peer, model, None if method == "fullgrad" else model.layer4, x, peer_k))
        add(method, 10, "pytorch-grad-cam", fn, timed_k=len(peer_k))
    return rows


def _find(rows, **key):
    return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)


def markdown(rows: list[dict]) -> str:
    out = ["| method | K | who | time (s) | per class (s) | peer / funcam |", "|---|---|---|---|---|---|"]
    for r in rows:
        mine = _find(rows, method=r["method"], K=r["K"], who="funcam")
        ratio = f"{r['median_s'] / mine['median_s']:.1f}x" if mine and r["who"] != "funcam" else ""
        per = f"{r['median_s'] / r['K']:.4f}" if r["K"] else ""
        est = f" (timed on {r['timed_classes']}, extrapolated)" if r["extrapolated"] else ""
        out.append(f"| {r['method']}{' @ ' + r['layer'] if r['layer'] == 'layer3' else ''} | {r['K']} | {r['who']}"
                   f"{est} | {r['median_s']:.3f} | {per} | {ratio} |")
    return "\n".join(out)


def targets(rows: list[dict], n: int) -> list[dict]:
    """Issue 25's targets from the rows: (target, measured, limit, met)."""
    fwd = _find(rows, method="forward")["median_s"]
    goals = []

    def goal(text, measured, limit, at_most):
        goals.append({"target": text, "measured": measured, "limit": limit,
                      "met": measured <= limit if at_most else measured >= limit})

    s1, sn = _find(rows, method="scorecam", K=1, who="funcam"), _find(rows, method="scorecam", K=n, who="funcam")
    if sn:
        goal(f"scorecam K={n} / funcam K=1 <=", sn["median_s"] / s1["median_s"], 1.2, True)
        for peer in ("pytorch-grad-cam", "torchcam"):
            r = _find(rows, method="scorecam", K=n, who=peer)
            if r:
                goal(f"scorecam K={n}, speed-up over {peer} >=", r["median_s"] / sn["median_s"], 300.0, False)
    r = _find(rows, method="ablationcam", K=n, who="funcam")
    if r:
        goal(f"ablationcam pooled K={n} / one forward <=", r["median_s"] / fwd, 2.0, True)
    r = _find(rows, method="ablationcam", K=10, who="pytorch-grad-cam")
    if r:
        goal("ablationcam layer3 K=10, speed-up over per-class full-forward ablation >=",
             r["median_s"] / _find(rows, method="ablationcam", K=10, who="funcam")["median_s"], 20.0, False)
    r = _find(rows, method="eigencam", K=1, who="funcam")
    if r:
        goal("eigencam / one forward <=", r["median_s"] / fwd, 1.2, True)
    return goals


def targets_markdown(goals: list[dict]) -> str:
    out = ["| target | measured | limit | met |", "|---|---|---|---|"]
    out += [f"| {g['target']} | {g['measured']:.2f} | {g['limit']:g} | {'yes' if g['met'] else 'NO'} |" for g in goals]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000, help="N: the model's classes, all explained at once")
    p.add_argument("--peer-classes", type=int, default=2, help="classes the peers are timed on (then extrapolated)")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--methods", default="scorecam,ablationcam,eigencam,gradients",
                   help="which rows (comma-separated): scorecam, ablationcam, eigencam, gradients (the four at K = 10)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="smoke run: resnet18 at 32 px, 20 classes, peers on 1")
    p.add_argument("--json", default="benchmarks/cams_speed.json")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.classes, a.peer_classes, a.min_time = 32, 20, 1, 0.05
    a.methods = a.methods.split(",")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False, num_classes=a.classes).eval()
    x = torch.randn(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    rows = rows_for(model, x, a.classes, a)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "device": "cpu", "model": a.model,
            "size": a.size, "batch": a.batch, "classes": a.classes, "peer_classes": a.peer_classes,
            "total_s": time.perf_counter() - T0}
    print(f"\n{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, {a.model} at {a.size}x{a.size}, "
          f"B = {a.batch}, N = {a.classes} classes, random weights; whole run {meta['total_s'] / 60:.1f} min\n")
    print(markdown(rows))
    goals = targets(rows, a.classes)
    print("\nTargets (issue 25):\n")
    print(targets_markdown(goals))
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": goals}, f, indent=2)


if __name__ == "__main__":
    main()
