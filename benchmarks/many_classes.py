"""funcam vs the per-class autograd loop, for K classes of B images (random weights, CPU by default).

    python benchmarks/many_classes.py [--model resnet18] [--batch 8] [--size 224] [--ks 1,10,100] [--threads N]

Prints a Markdown table (median of repeated runs, ratios to one model forward) and writes JSON next to it
with the machine's metadata. The loop's cost is linear in K: it is timed over min(K, 10) classes and scaled.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch

import funcam


def median_time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up, never timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (max(times) - min(times))


def autograd_loop(model, x, classes):
    """The oracle's cost: one forward and one backward to the features per class."""
    out = []
    for k in classes:
        f = model.forward_features(x).detach().requires_grad_()
        (g,) = torch.autograd.grad(model.forward_head(f)[:, k].sum(), f)
        out.append(torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), f.detach())))
    return torch.stack(out, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ks", default="1,10,100")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default="benchmarks/many_classes.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    sp = funcam.split(model)
    with torch.no_grad():
        fwd, fwd_spread = median_time(lambda: model(x), a.repeats)
    rows = []
    for k in [int(v) for v in a.ks.split(",")]:
        classes = torch.arange(k)
        with torch.no_grad():
            t_f, s_f = median_time(lambda classes=classes: funcam.gradcam(sp, x, classes), a.repeats)
        timed = min(k, 10)
        t_l, s_l = median_time(lambda classes=classes[:timed]: autograd_loop(model, x, classes),
                               1 if timed > 1 else a.repeats)
        t_l *= k / timed
        rows.append({"K": k, "funcam_s": t_f, "funcam_spread_s": s_f, "loop_s": t_l, "loop_scaled_from": timed,
                     "funcam_vs_forward": t_f / fwd, "speedup_vs_loop": t_l / t_f})
    meta = {"model": a.model, "batch": a.batch, "size": a.size, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "device": "cpu", "forward_s": fwd, "forward_spread_s": fwd_spread}
    print(f"\n{a.model}, B={a.batch}, {a.size}x{a.size}, {meta['threads']} threads, torch {torch.__version__}, "
          f"one forward = {fwd:.3f} s\n")
    print("| K | funcam Grad-CAM (s) | x forward | autograd loop (s) | funcam speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        note = "" if r["loop_scaled_from"] == r["K"] else f" (from {r['loop_scaled_from']})"
        print(f"| {r['K']} | {r['funcam_s']:.3f} | {r['funcam_vs_forward']:.2f} | {r['loop_s']:.2f}{note} | "
              f"{r['speedup_vs_loop']:.1f}x |")
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
