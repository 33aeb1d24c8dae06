"""Pointing game on digits pasted on a cluttered 64x64 canvas, for a small CNN and a small hybrid ViT.

    python benchmarks/quality_digits.py [--n 500] [--threads 1]      # or: python -m benchmarks.quality_digits

Single task: one digit, the map of the predicted-or-true class must peak inside its box. Pair task: two
digits (multi-label), each class's map must peak inside its own digit's box. Models are trained once and
cached in benchmarks/cache/ (see benchmarks/_digits.py). Prints a Markdown table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _digits  # noqa: E402
from funcam._src.app.explain import explain  # noqa: E402
from funcam._src.core.metrics import pointing_game  # noqa: E402
from funcam._src.core.postprocess import upsample  # noqa: E402
from funcam.metrics import energy_in_box

CNN_METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise", "gradcam-max",
               "argmax-channel", "guided-gradcam")
VIT_METHODS = CNN_METHODS[:-1] + ("rollout", "grad-rollout", "chefer")


def baselines(shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Uniform noise and a centre prior (a Gaussian bump at the canvas centre), maps (B, K, H, W)."""
    b, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(h).view(h, 1) - (h - 1) / 2
    xs = torch.arange(w).view(1, w) - (w - 1) / 2
    centre = torch.exp(-(ys ** 2 + xs ** 2) / (2 * (h / 4) ** 2)).expand(b, k, h, w)
    return {"random": torch.rand(shape, generator=g), "centre": centre.contiguous()}


def evaluate(model, data: _digits.Canvases, methods, *, batch: int = 100) -> dict[str, dict[str, float]]:
    """Pointing (0 px, 2 px) and energy in box per method, explaining each image's true classes."""
    rows: dict[str, dict[str, float]] = {}
    size = data.x.shape[-2:]
    for name in methods:
        hits0, hits2, energy = [], [], []
        t0 = time.perf_counter()
        for i in range(0, len(data.x), batch):
            x, cls, box = data.x[i:i + batch], data.labels[i:i + batch], data.boxes[i:i + batch]
            maps = explain(model, x, method=name, classes=cls).maps.detach()
            maps = upsample(maps, size) if maps.shape[-2:] != size else maps
            hits0.append(pointing_game(maps, box))
            hits2.append(pointing_game(maps, box, tolerance=2))
            energy.append(energy_in_box(maps, box))
        rows[name] = {"pointing": torch.cat(hits0).float().mean().item(),
                      "pointing_2px": torch.cat(hits2).float().mean().item(),
                      "energy": torch.cat(energy).mean().item(), "seconds": time.perf_counter() - t0}
    for name, maps in baselines(tuple(data.labels.shape) + tuple(size), seed=0).items():
        rows[name] = {"pointing": pointing_game(maps, data.boxes).float().mean().item(),
                      "pointing_2px": pointing_game(maps, data.boxes, tolerance=2).float().mean().item(),
                      "energy": energy_in_box(maps, data.boxes).mean().item(), "seconds": 0.0}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="test canvases per task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="cnn,vit", help="comma-separated: cnn, vit (local stem), vit-overlap")
    p.add_argument("--tasks", default="single,pair")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_digits.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    for kind in a.models.split(","):
        for task in a.tasks.split(","):
            model = _digits.load_or_train(kind, task)
            data = _digits.make_canvases(a.n, task=task, split="test", seed=2024)
            acc = _digits.accuracy(model, data)
            rows = evaluate(model, data, CNN_METHODS if kind == "cnn" else VIT_METHODS)
            results[f"{kind}-{task}"] = {"accuracy": acc, "rows": rows}
            print(f"\n### {kind.upper()}, {task} task (test accuracy {acc:.3f}, {a.n} canvases)\n")
            print("| method | pointing 0 px | pointing 2 px | energy in box |")
            print("|---|---|---|---|")
            for name, r in rows.items():
                print(f"| {name} | {r['pointing']:.3f} | {r['pointing_2px']:.3f} | {r['energy']:.3f} |")
            sys.stdout.flush()
    with open(a.json, "w") as f:
        json.dump({"n": a.n, "threads": a.threads, "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
