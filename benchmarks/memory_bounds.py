"""Peak memory of many-class CAMs, and how ``max_memory`` bounds it (CPU, peak resident set size).

    python benchmarks/memory_bounds.py [--quick] [--json benchmarks/memory_bounds.json]

Each configuration runs in a fresh Python process: build the model (random weights), run one forward under
``torch.no_grad()`` (warm-up), reset the kernel's high-water mark (``/proc/self/clear_refs``), then make the
measured call and read ``VmHWM``. The table gives the peak above the resident size just before the call, next
to the same figure for a plain ``torch.no_grad()`` forward of the same batch, and the wall time of the call.

Full run: resnet50 at 224x224, B = 32, K = 1000 (the fast path for its average-pooled head), and the general
vjp path (the pooled head forced off) where chunking matters: without it the ``(K, B, C, h, w)`` gradient
is 12.8 GB. ``--quick``: resnet18 at 64x64, B = 4, K = 10, seconds (a smoke test in the test suite).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MiB = 2**20

# name -> (what, the call's Python source with `sp`, `model`, `x`, `K` in scope)
CALLS = {
    "forward": ("one forward, no_grad (reference)", "with torch.no_grad(): model(x)"),
    "gradcam": ("Grad-CAM, funcam.cam defaults (grad mode on)", "funcam.gradcam(sp, x, torch.arange(K))"),
    "gradcam-nograd": ("Grad-CAM under torch.no_grad()",
                       "with torch.no_grad(): funcam.gradcam(sp, x, torch.arange(K))"),
    "gradcampp-nograd": ("Grad-CAM++ under torch.no_grad()",
                         "with torch.no_grad(): funcam.gradcampp(sp, x, torch.arange(K))"),
    "explain": ("funcam.explain.explain(method='gradcam')",
                "explain(model, x, method='gradcam', classes=torch.arange(K))"),
    "general-default": ("general path, max_memory default (128 MiB)",
                        "with torch.no_grad(): funcam.gradcam(sp._replace(pooled=None), x, torch.arange(K))"),
    "general-512": ("general path, max_memory=512 MiB",
                    "with torch.no_grad(): funcam.gradcam(sp._replace(pooled=None), x, torch.arange(K), "
                    "max_memory=512 * 2**20)"),
    "general-64": ("general path, max_memory=64 MiB",
                   "with torch.no_grad(): funcam.gradcam(sp._replace(pooled=None), x, torch.arange(K), "
                   "max_memory=64 * 2**20)"),
    "general-unchunked-100": ("general path, K = 100, chunk_size=K (no chunking)",
                              "with torch.no_grad(): funcam.gradcam(sp._replace(pooled=None), x, "
                              "torch.arange(100), chunk_size=100)"),
}

CHILD = """
import time, timm, torch, funcam
from funcam.explain import explain
torch.manual_seed(0)
model = timm.create_model({model!r}, pretrained=False).eval()
x = torch.randn({batch}, 3, {size}, {size})
sp, K = funcam.split(model), {k}
with torch.no_grad():
    model(x)
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM to the current resident size
before = status('VmRSS:')
t0 = time.perf_counter()
{call}
print(status('VmHWM:') - before, time.perf_counter() - t0)
"""


def measure(call: str, model: str, batch: int, size: int, k: int, threads: int) -> tuple[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    src = CHILD.format(model=model, batch=batch, size=size, k=k, call=call)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr[-2000:]}")
    peak, secs = out.stdout.split()[-2:]
    return int(peak), float(secs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="resnet18, 64x64, B=4, K=10")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default="benchmarks/memory_bounds.json")
    a = p.parse_args(argv)
    model, batch, size, k = ("resnet18", 4, 64, 10) if a.quick else ("resnet50", 32, 224, 1000)
    rows = []
    for name, (what, call) in CALLS.items():
        peak, secs = measure(call, model, batch, size, k, a.threads)
        rows.append({"config": name, "what": what, "peak_above_bytes": peak, "seconds": secs})
    fwd = rows[0]["peak_above_bytes"]
    print(f"{model}, B = {batch}, {size}x{size}, K = {k} unless said; peak RSS above the process before the call\n")
    print("| call | peak above (MiB) | minus the forward's (MiB) | seconds |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['peak_above_bytes'] / MiB:.0f} | {(r['peak_above_bytes'] - fwd) / MiB:+.0f} "
              f"| {r['seconds']:.2f} |")
    meta = {"model": model, "batch": batch, "size": size, "k": k, "threads": a.threads,
            "python": platform.python_version(), "machine": platform.machine(), "time": time.time()}
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
