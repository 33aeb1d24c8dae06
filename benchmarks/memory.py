"""Peak resident memory and wall time of many-class CAMs, each configuration in a fresh process (CPU).

    python benchmarks/memory.py                    # resnet50: 26 processes, 6-11 min on 2 CPU threads
    python benchmarks/memory.py --quick            # a smoke run on resnet18 at 64 px (about 20 s)
    python benchmarks/memory.py --malloc mmap      # reproducible live-tensor peaks (times not meaningful)
    python -m benchmarks.memory --only fast-gradcam-nograd,general-gradcam-64MiB --repeats 1
    python benchmarks/memory.py --only general-gradcampp-defaults --general-batch 16 --general-k 1000  # grad mode
    python benchmarks/memory.py --model vit_small_patch16_224 --methods attnlrp --general-batch 2 --malloc mmap \
        --only general-attnlrp-defaults,general-attnlrp-nograd        # LRP (its graph captured before the call)

Every configuration runs in its own Python process, so that no allocator cache or autograd graph of an
earlier one is counted: build the model (timm, random weights), run one forward under ``torch.no_grad()``
(what the baseline process does, and it warms up lazily created kernels), then make the measured call
``--repeats`` times (each result dropped before the next call). Two memory figures, both from the kernel's
resident-set high-water mark (``VmHWM`` in ``/proc/self/status``, the figure ``ru_maxrss`` reports):

* **above baseline**: the process's peak minus the peak of a baseline process that only builds the model and
  runs the forward ``1 + repeats`` times under ``torch.no_grad()``: what the explanation costs on top of
  inference with the same batch;
* **call peak**: the high-water mark during the calls above the resident size just before them (reset with
  ``/proc/self/clear_refs`` after glibc's ``malloc_trim``): the call's own footprint, its forward included.

Allocator noise: with glibc's default ``malloc``, freed tensors stay in its heap in patterns that vary from
run to run, and the same call's peak varies by up to ~250 MiB at these sizes (measured: 109-371 MiB for one
general-path configuration over 17 processes). ``--malloc mmap`` sets ``MALLOC_MMAP_THRESHOLD_`` to 64 KiB:
every tensor gets its own mapping, returned when freed, so the peak is that of live tensors, reproducible to
about 1 MiB, at the price of a page fault per fresh page (calls run 3-15x slower).

Configurations. The average-pool fast path (resnet50's head): B = 32 images at 224x224, K = 1000 classes,
Grad-CAM and Grad-CAM++ with ``funcam.cam``'s defaults (grad mode on: the maps stay differentiable), inside
``torch.no_grad()`` (max_memory's default), through ``funcam.explain.explain`` (which runs under no_grad),
with ``max_memory`` at 64 and 256 MiB, and unchunked (``chunk_size=K``). The general vjp path (the same model
with ``funcam.split(model)._replace(pooled=None)``, where the per-class gradient is ``(B, C, h, w)`` and
chunking matters): B = 8, K = 100, ``max_memory`` 16/64/128 (default)/512 MiB, unchunked, and the default
with grad mode on. The classes-per-chunk column is what the engine passed to ``torch.func.vmap``. The maps'
checksums are compared across the configurations of one method: they compute the same maps.

Output: a Markdown table on stdout and JSON with the machine's metadata (``--json``). Memory figures do not
depend on the machine's load; times do (other jobs sharing the cores slow them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``funcam`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._machine import cpu_name  # noqa: E402

MiB = 2**20

# variant -> what it is; "<n>MiB" is no_grad with max_memory=n MiB
FAST = {
    "defaults": "funcam.cam defaults (grad mode on)",
    "nograd": "under torch.no_grad() (max_memory default 128 MiB)",
    "explain": "funcam.explain.explain (runs under no_grad)",
    "64MiB": "no_grad, max_memory=64 MiB",
    "256MiB": "no_grad, max_memory=256 MiB",
    "unchunked": "no_grad, chunk_size=K (no chunking)",
}
GENERAL = {
    "defaults": "funcam.cam defaults (grad mode on)",
    "16MiB": "no_grad, max_memory=16 MiB",
    "64MiB": "no_grad, max_memory=64 MiB",
    "nograd": "under torch.no_grad() (max_memory default 128 MiB)",
    "512MiB": "no_grad, max_memory=512 MiB",
    "unchunked": "no_grad, chunk_size=K (no chunking)",
}
QUICK = ("fast-gradcam-defaults", "fast-gradcam-explain", "general-gradcampp-16MiB")
LRP = ("attnlrp", "cplrp")  # methods whose rewritten graph is captured before the measured call


def configs(methods: list[str]) -> dict[str, dict]:
    """Every configuration by name: ``{path}-{method}-{variant}``, plus one baseline per path."""
    out = {f"{path}-baseline": {"path": path, "method": None, "variant": "baseline",
                                "what": "baseline: one no_grad forward"} for path in ("fast", "general")}
    for path, table in (("fast", FAST), ("general", GENERAL)):
        for m in methods:
            for variant, what in table.items():
                out[f"{path}-{m}-{variant}"] = {"path": path, "method": m, "variant": variant, "what": what}
    return out


def make_call(variant: str, method: str | None, sp, model, x, classes):
    """The measured call of a configuration, as a function of nothing."""
    import torch

    import funcam
    from funcam.explain import explain

    def nograd(**opts):
        def call():
            with torch.no_grad():
                return funcam.cam(sp, x, classes, method=method, **opts)
        return call

    if variant == "baseline":
        def forward():
            with torch.no_grad():
                return model(x)
        return forward
    if variant == "defaults":
        return lambda: funcam.cam(sp, x, classes, method=method)
    if variant == "nograd":
        return nograd()
    if variant == "explain":
        return lambda: explain(model, x, method=method, classes=classes)
    if variant == "unchunked":
        return nograd(chunk_size=len(classes))
    if variant.endswith("MiB"):
        return nograd(max_memory=int(variant[:-3]) * MiB)
    raise ValueError(f"unknown variant {variant!r}")


# ---------------------------------------------------------------------------------------------- the child

def _status(key: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS:``, ``VmHWM:``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the RSS before the call holds no stale pages."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    """Run one configuration in this (fresh) process; returns its measurements."""
    import timm
    import torch

    import funcam

    torch.manual_seed(0)
    model = timm.create_model(spec["model"], pretrained=False).eval()
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    sp = funcam.split(model)
    if spec["path"] == "general":
        sp = sp._replace(pooled=None)
    if (sp.pooled is not None) != (spec["path"] == "fast"):
        raise RuntimeError(f"{spec['model']}: expected the {spec['path']} path, split.pooled = {sp.pooled}")
    classes = torch.arange(spec["k"])
    with torch.no_grad():
        model(x)  # the baseline's work; also warms up lazily initialised kernels
    if spec["method"] in LRP:  # its graph capture, once per input size, is not part of the measured call
        from funcam._src.core.lrp import graph_for, rule_set
        graph_for(model, x, rule_set(spec["method"]))
    process_before = _status("VmHWM:")
    _trim()
    rss_before = _status("VmRSS:")
    reset = _reset_peak()
    call = make_call(spec["variant"], spec["method"], sp, model, x, classes)
    times, check, chunks = [], None, []
    real_vmap = torch.func.vmap

    def vmap(fn, *args, chunk_size=None, **kwargs):  # records the classes per chunk the engine chose
        chunks.append(chunk_size)
        return real_vmap(fn, *args, chunk_size=chunk_size, **kwargs)

    for i in range(spec["repeats"]):
        torch.func.vmap = vmap if i == 0 else real_vmap
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        if check is None and spec["variant"] != "baseline":
            maps = out.maps.detach().double()
            if not bool(torch.isfinite(maps).all()) or not bool((maps != 0).any()):
                raise RuntimeError(f"{spec['name']}: maps are all zero or not finite")
            check = [float(maps.sum()), float(maps.abs().sum()), list(maps.shape)]
        del out
    torch.func.vmap = real_vmap
    call_peak = _status("VmHWM:")
    return {"chunk_sizes": chunks, "process_peak_bytes": max(process_before, call_peak), "call_peak_above_bytes":
            call_peak - rss_before if reset else None, "rss_before_bytes": rss_before, "times_s": times,
            "checksum": check, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------- the parent

def run_child(spec: dict, threads: int, malloc: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if malloc == "mmap":
        # every allocation of 64 KiB or more gets its own mapping, unmapped when freed: the resident peak is
        # the peak of live tensors, reproducible to about 1 MiB (glibc's default keeps freed blocks in its
        # heap; which ones it can hand back varies run to run by a few hundred MiB at these sizes)
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 2**10)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"configuration {spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], sizes: dict, times: bool = True) -> str:
    lines = []
    for path in ("fast", "general"):
        group = [r for r in rows if r["path"] == path]
        if not group:
            continue
        s = sizes[path]
        base = next(r for r in group if r["variant"] == "baseline")
        lines += ["", f"**{s['title']}**: {s['model']}, B = {s['batch']}, {s['size']}x{s['size']}, "
                      f"K = {s['k']}; baseline process peak {base['process_peak_bytes'] / MiB:.0f} MiB, "
                      f"one no_grad forward {base['median_s']:.2f} s", "",
                  "| method | configuration | classes per chunk | peak above baseline (MiB) | call peak (MiB) "
                  "| seconds | x forward |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in group:
            call = "" if r["call_peak_above_bytes"] is None else f"{r['call_peak_above_bytes'] / MiB:.0f}"
            lines.append(f"| {r['method'] or '-'} | {r['what']} | {_chunks(r, s['k'])} | "
                         f"{r['above_baseline_bytes'] / MiB:.0f} | {call} | "
                         + (f"{r['median_s']:.2f} | {r['median_s'] / base['median_s']:.2f} |" if times else "- | - |"))
    return "\n".join(lines)


def _chunks(row: dict, k: int) -> str:
    """The engine's vmapped chunk size(s) for the K classes: "all" when unchunked."""
    if row["variant"] == "baseline":
        return ""
    sizes = sorted({k if c is None else c for c in row["chunk_sizes"]})
    return ", ".join("all" if c >= k else str(c) for c in sizes) or "-"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="resnet18 at 64x64 (B = 4/2, K = 10), a few configurations")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--methods", default="gradcam,gradcampp")
    p.add_argument("--repeats", type=int, default=2, help="calls per process (time: their median)")
    p.add_argument("--only", default="", help="comma-separated configuration names (baselines are always run)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of each process")
    p.add_argument("--malloc", choices=("glibc", "mmap"), default="glibc",
                   help="glibc: the allocator as users run it (default); mmap: MALLOC_MMAP_THRESHOLD_=64 KiB, so "
                        "peaks are those of live tensors and reproducible, but times are not meaningful")
    p.add_argument("--json", default="benchmarks/memory.json")
    p.add_argument("--general-batch", type=int, default=8, help="B of the general path's configurations")
    p.add_argument("--general-k", type=int, default=100, help="K of the general path's configurations")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.quick:
        a.model, a.repeats = "resnet18", 1
        sizes = {"fast": {"batch": 4, "size": 64, "k": 10}, "general": {"batch": 2, "size": 64, "k": 10}}
    else:
        sizes = {"fast": {"batch": 32, "size": 224, "k": 1000},
                 "general": {"batch": a.general_batch, "size": 224, "k": a.general_k}}
    sizes["fast"]["title"], sizes["general"]["title"] = "Average-pool fast path", "General vjp path (pooled=None)"
    todo = configs(a.methods.split(","))
    only = set(a.only.split(",")) - {""} or (set(QUICK) if a.quick else set(todo))
    unknown = only - set(todo)
    if unknown:
        raise SystemExit(f"--only: unknown configurations {sorted(unknown)}; known: {', '.join(todo)}")
    paths = {todo[n]["path"] for n in only}
    names = [n for n, c in todo.items() if n in only or (c["variant"] == "baseline" and c["path"] in paths)]
    t0 = time.perf_counter()
    rows = []
    for name in names:
        c = todo[name]
        size = sizes[c["path"]]
        spec = {"name": name, "model": a.model, "repeats": a.repeats, "batch": size["batch"], "size": size["size"],
                "k": size["k"], **{k: c[k] for k in ("path", "method", "variant")}}
        res = run_child(spec, a.threads, a.malloc)
        rows.append({**{k: c[k] for k in ("path", "method", "variant", "what")}, "config": name, **res,
                     "median_s": statistics.median(res["times_s"])})
        print(f"{name}: peak {res['process_peak_bytes'] / MiB:.0f} MiB, {rows[-1]['median_s']:.2f} s",
              file=sys.stderr, flush=True)
    for r in rows:
        base = next(b for b in rows if b["path"] == r["path"] and b["variant"] == "baseline")
        r["above_baseline_bytes"] = r["process_peak_bytes"] - base["process_peak_bytes"]
        # every configuration of one (path, method) computes the same maps: compare their checksums
        same = [o["checksum"] for o in rows if (o["path"], o["method"]) == (r["path"], r["method"]) and o["checksum"]]
        if r["checksum"] and any(abs(s[0] - r["checksum"][0]) > 1e-4 * s[1] or s[2] != r["checksum"][2] for s in same):
            raise RuntimeError(f"{r['config']}: its maps differ from those of the same method elsewhere: {same}")
    meta = {"model": a.model, "sizes": sizes, "threads": a.threads, "repeats": a.repeats, "quick": a.quick,
            "malloc": a.malloc,
            "python": platform.python_version(), "torch": _version("torch"), "timm": _version("timm"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine(), "device": "cpu",
            "memory_total_bytes": _meminfo_total(), "total_s": time.perf_counter() - t0, "time": time.time()}
    for s in sizes.values():
        s["model"] = a.model
    print(f"\n{meta['cpu']}, {a.threads} threads per process, torch {meta['torch']}, random weights; peaks from "
          f"VmHWM, allocator: {a.malloc}; whole run {meta['total_s'] / 60:.1f} min")
    print(markdown(rows, sizes, times=a.malloc == "glibc"))
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _meminfo_total() -> int | None:
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    return None


if __name__ == "__main__":
    main()
