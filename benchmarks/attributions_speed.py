"""Integrated Gradients and SmoothGrad for B images x K classes: funcam against captum 0.9, side by side (CPU).

    python benchmarks/attributions_speed.py               # resnet50 at 224, B = 4, K = 8, S = 32; and K = 1000
    python benchmarks/attributions_speed.py --budget 128 --budget 2048   # funcam at two max_memory values
    python benchmarks/attributions_speed.py --quick       # resnet18 at 64 px, B = 2, K = 3, S = 4 (a smoke run)
    python -m benchmarks.attributions_speed --only ig --json out.json

What runs. timm's model with random weights (``eval()``, parameters frozen for both), x ``(B, 3, H, W)`` seeded,
classes ``0..K-1`` for every image, S = ``n_steps`` (Integrated Gradients, Gauss-Legendre) or ``nt_samples``
(SmoothGrad, stdevs 0.5). funcam: ``funcam.cam(model, x, classes, method=..., max_memory=M)`` under
``torch.no_grad()`` (maps without a graph, as ``funcam.explain`` runs), one K x S vmapped call. captum explains one
target per image and call, so its K classes are K calls (``loop``), or one call on the K-fold repeated batch with
K * B targets (``repeat``); its ``internal_batch_size`` (IG) / ``nt_samples_batch_size`` (NoiseTunnel) is varied
(``batch``: images per forward; see ``contenders``) and the best counts. captum's NoiseTunnel gets funcam's noise (its
``torch.normal`` patched), so both compute the same maps: the checksums must agree (else the run stops).
K = 1000 (resnet18 at 64 px, B = 2, S = 4): funcam in chunks under max_memory; captum would take 1000 calls, so
its time is its K = 8 run's scaled by 125.

Every contender runs in a fresh Python process (allocator caches and graphs of another do not count): build the
model, run one ``no_grad`` forward of x (warms up kernels), then ``--repeats`` calls (the fastest counts). Time:
wall and CPU time (``time.process_time``) of the call, with one intra-op thread by default: the ratios use CPU time,
which other jobs sharing the cores change far less than wall time (this project's machine is shared). Memory: the
growth of the resident-set high-water mark over the resident size before the calls (``VmHWM`` reset by
``/proc/self/clear_refs`` after ``malloc_trim``; the helpers of ``benchmarks/memory.py``): the model's weights are
not counted, the forward of the S x B points and the K backwards are. Targets: funcam at most 0.6x captum's best
for IG and SmoothGrad; funcam's peak growth within ``max_memory`` (a budget below one sample's forward of B images,
the smallest step, cannot hold); K = 1000. Losses are listed with the wins.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``funcam`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._machine import cpu_name  # noqa: E402
from benchmarks.memory import _reset_peak, _status, _trim  # noqa: E402

MiB = 2**20
STDEVS = 0.5
FULL = {"model": "resnet50", "size": 224, "batch": 4, "k": 8, "s": 32}
MANY = {"model": "resnet18", "size": 64, "batch": 2, "k": 1000, "s": 4}  # K = 1000: funcam only, in chunks
QUICK = {"model": "resnet18", "size": 64, "batch": 2, "k": 3, "s": 4}
QUICK_MANY = {"model": "resnet18", "size": 32, "batch": 1, "k": 1000, "s": 2}


def contenders(cfg: dict, methods: list[str], budgets: list[int]) -> list[dict]:
    """Every (who, method, variant) to run on ``cfg``: funcam at each budget (MiB); captum's K calls with up to 32
    images per forward (``internal_batch_size`` / ``nt_samples_batch_size``), and for IG also its one call on the
    K-fold repeated batch, K * B images per forward. Not larger: 32 resnet50 images keep about 3 GiB of activations
    for the backward, all S * B = 128 of them four times that, more than this shared machine should give one run."""
    b, k, s = cfg["batch"], cfg["k"], cfg["s"]
    rows = min(b * s, 32)
    out = []
    for method in methods:
        out += [dict(cfg, who="funcam", method=method, variant=f"max_memory={m} MiB", max_memory=m * MiB)
                for m in budgets]
        out.append(dict(cfg, who="captum", method=method, variant=f"loop, batch={rows}", batch_rows=rows))
        if method == "ig":
            out.append(dict(cfg, who="captum", method=method, variant=f"repeat, batch={k * b}", batch_rows=k * b,
                            repeat=True))
    return out


# ---------------------------------------------------------------------------------------------- the child

def _noise(spec: dict, x):
    import torch

    return STDEVS * torch.randn((spec["s"],) + tuple(x.shape), generator=torch.Generator().manual_seed(1))


def make_call(spec: dict, model, x, classes):
    """The measured call: returns the maps (B, K, C, H, W)."""
    import torch

    import funcam

    s = spec["s"]
    if spec["who"] == "funcam":
        opts = {"n_steps": s} if spec["method"] == "ig" else {"nt_samples": s, "stdevs": STDEVS}
        name = "integrated_gradients" if spec["method"] == "ig" else "smoothgrad"

        def call():
            if name == "smoothgrad":  # the draw is part of the call, from a seeded generator
                opts["generator"] = torch.Generator().manual_seed(1)
            with torch.no_grad():
                return funcam.cam(model, x, classes, method=name, max_memory=spec["max_memory"], **opts).maps
        return call

    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    b, k = x.shape[0], classes.numel()
    noise = _noise(spec, x)
    rows = spec["batch_rows"]
    reps = k if spec.get("repeat") else 1
    xs = x.repeat(reps, 1, 1, 1)  # (K * B, ...) for "repeat": image i of class j at row j * B + i
    # (S, K * B, ...) for "repeat": every class's copy of an image gets the image's noise
    state = {"at": 0, "noise": noise.repeat(1, reps, 1, 1, 1)}

    def normal(mean, std):  # captum's draw for one partition of samples, rows (B, s): the same noise as funcam's
        n = std.shape[0] // state["noise"].shape[1]
        part = state["noise"][state["at"]:state["at"] + n]
        state["at"] += n
        return part.transpose(0, 1).flatten(0, 1).clone()

    if spec["method"] == "ig":
        ig = IntegratedGradients(model)

        def one(inp, target):
            return ig.attribute(inp, target=target, n_steps=s, internal_batch_size=rows)
    else:
        nt = NoiseTunnel(Saliency(model))

        def one(inp, target):
            state["at"] = 0
            real = torch.normal
            torch.normal = normal
            try:
                return nt.attribute(inp, target=target, nt_type="smoothgrad", nt_samples=s, stdevs=STDEVS,
                                    nt_samples_batch_size=max(1, rows // inp.shape[0]))
            finally:
                torch.normal = real

    def call():
        if spec.get("repeat"):
            out = one(xs, classes.repeat_interleave(b))  # (K * B, ...)
            return out.unflatten(0, (k, b)).transpose(0, 1)
        return torch.stack([one(x, int(c)) for c in classes], dim=1)
    return call


def child(spec: dict) -> dict:
    import warnings

    import timm
    import torch

    warnings.simplefilter("ignore")  # captum warns that it sets requires_grad on the input
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], pretrained=False).eval().requires_grad_(False)
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    classes = torch.arange(spec["k"])
    with torch.no_grad():
        model(x)
    _trim()
    rss_before = _status("VmRSS:")
    reset = _reset_peak()
    call = make_call(spec, model, x, classes)
    times, cpu, check = [], [], None
    for _ in range(spec["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        maps = call()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if check is None:
            maps = maps.detach().double()
            if tuple(maps.shape) != (spec["batch"], spec["k"], 3, spec["size"], spec["size"]):
                raise RuntimeError(f"maps of shape {tuple(maps.shape)}")
            if not bool(torch.isfinite(maps).all()) or not bool((maps != 0).any()):
                raise RuntimeError("maps are all zero or not finite")
            check = [float(maps.sum()), float(maps.abs().sum())]
        del maps
    peak = _status("VmHWM:") - rss_before if reset else None
    return {"times_s": times, "cpu_s": cpu, "peak_growth_bytes": peak, "checksum": check,
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------- the parent

def run_child(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{spec['who']} {spec['method']} {spec['variant']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(targets, losses) from the rows: funcam's best and every budget against captum's best CPU time."""
    targets, losses = [], []
    for key in sorted({(r["model"], r["k"], r["method"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["k"], r["method"]) == key]
        mine = [r for r in group if r["who"] == "funcam"]
        theirs = [r for r in group if r["who"] == "captum"]
        what = f"{key[2]} {key[0]} B={group[0]['batch']} K={key[1]} S={group[0]['s']}"
        for r in mine:
            if r["peak_growth_bytes"] is not None:
                within = r["peak_growth_bytes"] <= r["max_memory"]
                targets.append({"target": f"{what}: funcam peak growth (MiB) <= max_memory ({r['variant']})",
                                "measured": r["peak_growth_bytes"] / MiB, "met": within})
                if not within:
                    losses.append({"what": f"{what} {r['variant']}", "peak_MiB": r["peak_growth_bytes"] / MiB,
                                   "why": "over max_memory"})
        if not (theirs and mine):
            continue
        best = min(theirs, key=lambda r: r["cpu"])
        fastest = min(mine, key=lambda r: r["cpu"])
        ratio = fastest["cpu"] / best["cpu"]
        targets.append({"target": f"{what}: funcam CPU time / captum's best <= 0.6", "measured": ratio,
                        "met": ratio <= 0.6, "funcam": fastest["variant"], "captum": best["variant"],
                        "wall_ratio": fastest["wall"] / min(r["wall"] for r in theirs)})
        for r in mine:
            if r["cpu"] > best["cpu"]:
                losses.append({"what": f"{what} {r['variant']}", "ratio": r["cpu"] / best["cpu"],
                               "why": "more CPU time than captum's best"})
        lean = min(theirs, key=lambda r: r["peak_growth_bytes"] or 0)
        for r in mine:
            if (r["peak_growth_bytes"] or 0) > (lean["peak_growth_bytes"] or 0):
                losses.append({"what": f"{what} {r['variant']}", "peak_MiB": r["peak_growth_bytes"] / MiB,
                               "captum_peak_MiB": lean["peak_growth_bytes"] / MiB,
                               "why": f"more memory than captum's leanest ({lean['variant']})"})
        for r in theirs:  # the same maps (float32 sums; captum's step sizes are float32)
            a, c = fastest["checksum"][1], r["checksum"][1]
            if abs(a - c) > 1e-3 * abs(c):
                raise RuntimeError(f"{what}: funcam's maps differ from captum {r['variant']}: {a} vs {c}")
    return targets, losses


def markdown(rows: list[dict]) -> str:
    lines = ["| method | model, B, K, S | who | variant | wall s | CPU s | CPU x captum's best | peak growth MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min((q["cpu"] for q in rows if q["who"] == "captum" and (q["model"], q["k"], q["method"])
                    == (r["model"], r["k"], r["method"])), default=None)
        peak = "n/a" if r["peak_growth_bytes"] is None else f"{r['peak_growth_bytes'] / MiB:.0f}"
        ratio = "" if best is None else f"{r['cpu'] / best:.2f}"
        lines.append(f"| {r['method']} | {r['model']} {r['size']}px, {r['batch']}, {r['k']}, {r['s']} | {r['who']} | "
                     f"{r['variant']} | {r['wall']:.2f} | {r['cpu']:.2f} | {ratio} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="resnet18 at 64 px, B = 2, K = 3, S = 4")
    p.add_argument("--only", choices=["ig", "smoothgrad"], action="append", help="one method (repeatable)")
    p.add_argument("--no-many", action="store_true", help="skip the K = 1000 run")
    p.add_argument("--budget", type=int, action="append", help="funcam's max_memory in MiB (repeatable; default 128)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="calls per contender, the fastest counts (default 1)")
    p.add_argument("--json", default="attributions_speed.json", help="where to write the rows and targets")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    import torch

    methods = a.only or ["ig", "smoothgrad"]
    repeats = a.repeats
    specs = contenders(QUICK if a.quick else FULL, methods, a.budget or [128])
    many = QUICK_MANY if a.quick else MANY
    if not a.no_many and "ig" in methods:
        specs += [dict(many, who="funcam", method="ig", variant=f"max_memory={m} MiB", max_memory=m * MiB)
                  for m in (a.budget or [128])]
        # captum asks for one target per image and call: K = 1000 is 1000 calls; timed at K = 8, scaled
        specs.append(dict(many, k=8, who="captum", method="ig", variant=f"loop, batch={many['batch'] * many['s']}",
                          batch_rows=many["batch"] * many["s"], repeat=False))
    t0 = time.perf_counter()
    rows = []
    for spec in specs:
        spec["repeats"] = repeats
        res = run_child(spec, a.threads)
        rows.append(dict(spec, **res, wall=min(res["times_s"]), cpu=min(res["cpu_s"])))
        print(f"{spec['who']:>7} {spec['method']:>10} {spec['variant']:<22} K={spec['k']:<5} {rows[-1]['wall']:8.2f} s"
              f" (CPU {rows[-1]['cpu']:8.2f} s)  peak +{(res['peak_growth_bytes'] or 0) / MiB:7.0f} MiB", flush=True)
    targets, losses = summarise(rows)
    per_class = [r["cpu"] / r["k"] for r in rows if r["who"] == "captum" and r["model"] == many["model"]
                 and r["size"] == many["size"] and r["k"] == 8]
    for r in rows:
        if r["who"] == "funcam" and r["k"] == many["k"] and per_class:
            est = per_class[0] * many["k"]
            targets.append({"target": f"ig {many['model']} B={many['batch']} K={many['k']} S={many['s']}: funcam CPU "
                                      f"time / captum's (K = 8 run x {many['k'] // 8}) ({r['variant']})",
                            "measured": r["cpu"] / est, "met": r["cpu"] < est, "captum_estimate_s": est})
    meta = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__, "python": platform.python_version(),
            "captum": _version("captum"), "total_s": time.perf_counter() - t0, "repeats": repeats}
    print(f"\n{meta['cpu']}, {a.threads} threads per process, torch {meta['torch']}, captum {meta['captum']}, random "
          f"weights, float32; whole run {meta['total_s'] / 60:.1f} min\n")
    print(markdown(rows))
    print("\ntargets:")
    for t in targets:
        print(f"  {'met' if t['met'] else 'NOT met'}: {t['target']}: {t['measured']:.2f}")
    print("losses:" if losses else "losses: none")
    for loss in losses:
        print("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in loss.items()))
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets, "losses": losses}, f, indent=2)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
