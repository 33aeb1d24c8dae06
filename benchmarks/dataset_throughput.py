"""Images/s of ``funcam explain-dir`` for EfficientNet-Lite0 (224 px, ImageNet weights), K = 5 and K = 1000,
one process vs ``torchrun --nproc-per-node 2`` (gloo on CPU, nccl on CUDA).

    python benchmarks/dataset_throughput.py [--images 64] [--procs 1,2] [--ks 5,1000] [--threads 1] [--device cpu]

The folder holds the six bundled photos (JPEG, 300-640 px) re-saved with small crops and flips until it has
``--images`` files, so decoding and resizing are part of the cost, as in a real run. Each setting runs once in a
fresh output folder; the rate counts from the start of ``explain_dataset`` to the merged manifest (rank 0's
``RunSummary.seconds``: model already loaded, workers and process group started), and the end-to-end wall time
(Python start-up, imports, model loading) is printed next to it. Prints a Markdown table; writes JSON with the
machine's load average before and after, since a shared machine's numbers move with its neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_folder(folder: str, n: int) -> None:
    from PIL import Image

    from funcam.images import sample_images

    photos = list(sample_images().values())
    for i in range(n):
        t = photos[i % len(photos)]
        k = i // len(photos)
        arr = t[:, k % 17:, (3 * k) % 23:].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr if k % 2 == 0 else arr[:, ::-1].copy())
        img.save(os.path.join(folder, f"img{i:04d}.jpg"), quality=90)


def run_one(folder: str, out: str, procs: int, k: int, args) -> dict:
    which = ["--classes", f"0-{k - 1}"] if k < 1000 else ["--all-classes"]
    cli = ["-m", "funcam.cli", "explain-dir", folder, "--out", out, *which, "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--shard-size", "64"] + (["--device", args.device] if args.device else [])
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                              if procs > 1 else []) + cli
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = re.search(r"(\d+) images, .*; ([\d.]+) s\s*$", proc.stderr.strip())
    n, seconds = int(m.group(1)), float(m.group(2))
    return {"procs": procs, "K": k, "images": n, "seconds": seconds, "images_per_s": n / seconds, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--ks", default="5,1000")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "dataset_throughput.json"))
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        make_folder(folder, args.images)
        for k in map(int, args.ks.split(",")):
            for procs in map(int, args.procs.split(",")):
                rows.append(run_one(folder, os.path.join(tmp, f"out-{k}-{procs}"), procs, k, args))
                r = rows[-1]
                print(f"K={k} procs={procs}: {r['images_per_s']:.2f} images/s ({r['seconds']:.1f} s for "
                      f"{r['images']} images; {r['wall_s']:.1f} s end to end)", file=sys.stderr)
    import torch

    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_before": load_before, "load_after": os.getloadavg(),
            "threads_per_process": args.threads, "workers_per_process": args.workers, "batch_size": args.batch_size,
            "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nEfficientNet-Lite0, 224 px, {args.images} JPEG photos, batch {args.batch_size}, {args.threads} thread(s) "
          f"and {args.workers} workers per process, {meta['device']}; load average {load_before[0]:.1f} before\n")
    print("| K | processes | images/s | seconds | end to end (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['procs']} | {r['images_per_s']:.2f} | {r['seconds']:.1f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
