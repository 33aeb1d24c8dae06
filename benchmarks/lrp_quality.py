"""Pointing game of funcam's LRP rule sets beside Chefer relevance and Grad-CAM, on the digit canvases of
``benchmarks/quality_digits.py`` (models trained there, cached in benchmarks/cache/): the only trained ViT offline.

    python benchmarks/lrp_quality.py [--n 300] [--models vit,cnn] [--tasks single,pair] [--threads 2] [--steps 300]

For each test canvas the maps of its true classes (one digit, or two for the pair task): pointing (the map's maximum
inside the class's digit box, exactly or within 2 px) and the share of positive mass inside the box. LRP maps are
signed and at pixel resolution (the maximum is the most positive pixel); Chefer and Grad-CAM maps are on the token /
feature grid, upsampled bilinearly as in quality_digits.py. Prints a Markdown table, writes JSON.
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
from benchmarks.quality_digits import baselines  # noqa: E402
from funcam._src.app.explain import explain  # noqa: E402
from funcam._src.core.metrics import energy_in_box, pointing_game  # noqa: E402
from funcam._src.core.postprocess import upsample  # noqa: E402
from tests.conftest import lrp  # noqa: E402

METHODS = {"vit": ("attnlrp", "cplrp", "epsilon_plus", "chefer", "gradcam"),
           "cnn": ("attnlrp", "epsilon_plus", "epsilon_alpha2_beta1", "gradcam", "guided-gradcam")}


def maps_of(model, x, classes, name: str):
    if name in ("attnlrp", "cplrp", "epsilon_plus", "epsilon_alpha2_beta1"):
        return lrp(model, x, classes, rule=name).maps
    return explain(model, x, method=name, classes=classes).maps


def evaluate(model, data: _digits.Canvases, methods, batch: int) -> dict:
    rows = {}
    size = data.x.shape[-2:]
    for name in methods:
        hits0, hits2, energy = [], [], []
        t0 = time.perf_counter()
        for i in range(0, len(data.x), batch):
            x, cls, box = data.x[i:i + batch], data.labels[i:i + batch], data.boxes[i:i + batch]
            with torch.no_grad():
                maps = maps_of(model, x, cls, name).detach()
            if maps.ndim == 5:  # guided: input gradients per channel
                maps = maps.sum(2)
            maps = upsample(maps, size) if maps.shape[-2:] != size else maps
            hits0.append(pointing_game(maps, box))
            hits2.append(pointing_game(maps, box, tolerance=2))
            energy.append(energy_in_box(maps, box))
        rows[name] = {"pointing": torch.cat(hits0).float().mean().item(),
                      "pointing_2px": torch.cat(hits2).float().mean().item(),
                      "energy": torch.cat(energy).mean().item(), "seconds": time.perf_counter() - t0}
        print(f"  {name}: {rows[name]}", flush=True)
    for name, maps in baselines(tuple(data.labels.shape) + tuple(size), seed=0).items():
        rows[name] = {"pointing": pointing_game(maps, data.boxes).float().mean().item(),
                      "pointing_2px": pointing_game(maps, data.boxes, tolerance=2).float().mean().item(),
                      "energy": energy_in_box(maps, data.boxes).mean().item(), "seconds": 0.0}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="test canvases per task")
    p.add_argument("--models", default="vit,cnn")
    p.add_argument("--tasks", default="single,pair")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="training steps of the models (default: _digits.CONFIGS'); "
                                                           "fewer train faster and point worse")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lrp_quality.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    for kind in a.models.split(","):
        for task in a.tasks.split(","):
            model = _digits.load_or_train(kind, task, steps=a.steps)
            data = _digits.make_canvases(a.n, task=task, split="test", seed=2024)
            acc = _digits.accuracy(model, data)
            print(f"\n### {kind.upper()}, {task} task (test accuracy {acc:.3f}, {a.n} canvases)\n", flush=True)
            rows = evaluate(model, data, METHODS[kind], a.batch)
            results[f"{kind}-{task}"] = {"accuracy": acc, "rows": rows}
            print("| method | pointing 0 px | pointing 2 px | energy in box |\n|---|---|---|---|")
            for name, r in rows.items():
                print(f"| {name} | {r['pointing']:.3f} | {r['pointing_2px']:.3f} | {r['energy']:.3f} |")
            sys.stdout.flush()
    with open(a.json, "w") as f:
        json.dump({"n": a.n, "threads": a.threads, "steps": a.steps, "torch": torch.__version__, "results": results}, f,
                  indent=1)


if __name__ == "__main__":
    main()
