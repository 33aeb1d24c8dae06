"""Faithfulness on the bundled photos with EfficientNet-Lite0: deletion / insertion AUC (RISE) and average drop /
increase in confidence (Grad-CAM++) for every CAM method, next to random-map baselines.

    python benchmarks/quality_faithfulness.py [--steps 16] [--threads 1]
    python -m benchmarks.quality_faithfulness                              # the same

Each photo is explained for its own top-1 class. Deletion: zeros replace the highest-ranked pixels first
(lower AUC is better); insertion: pixels appear on a blurred copy (higher is better). Prints Markdown, writes JSON.
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

from funcam._src.app.explain import explain  # noqa: E402
from funcam._src.app.images import sample_images  # noqa: E402
from funcam._src.app.models import preprocess  # noqa: E402
from funcam._src.core.metrics import deletion_insertion  # noqa: E402
from funcam._src.core.postprocess import upsample  # noqa: E402
from funcam.metrics import confidence_change
from funcam.models import load_model

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise", "gradcam-max",
           "argmax-channel")


def run(*, steps: int = 16, methods=METHODS, seed: int = 0) -> dict[str, dict[str, float]]:
    model, cfg = load_model()
    photos = sample_images()
    x = preprocess([photos[k] for k in sorted(photos)], cfg)
    with torch.no_grad():
        classes = model(x).argmax(dim=1, keepdim=True)
    size = x.shape[-2:]
    candidates = {name: lambda name=name: upsample(explain(model, x, method=name, classes=classes).maps.detach(), size)
                  for name in methods}
    g = torch.Generator().manual_seed(seed)
    # random maps at the CAMs' own 7x7 resolution, upsampled the same way: the fair baseline. Per-pixel noise
    # is reported too; deleting scattered single pixels wrecks the image (out of distribution) very fast.
    candidates["random (7x7)"] = lambda: upsample(torch.rand(x.shape[0], 1, 7, 7, generator=g), size)
    candidates["random (per pixel)"] = lambda: torch.rand(x.shape[0], 1, *size, generator=g)
    rows = {}
    for name, make in candidates.items():
        t0 = time.perf_counter()
        maps = make()
        di = deletion_insertion(model, x, maps, classes, steps=steps, chunk_size=32)
        cc = confidence_change(model, x, maps, classes)
        rows[name] = {"deletion_auc": di.deletion_auc.mean().item(), "insertion_auc": di.insertion_auc.mean().item(),
                      "average_drop": 100 * cc.drop.mean().item(),
                      "increase": 100 * cc.increase.float().mean().item(), "seconds": time.perf_counter() - t0}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "quality_faithfulness.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(steps=a.steps)
    print(f"\n### Faithfulness, EfficientNet-Lite0, 6 bundled photos, top-1 class, {a.steps} steps\n")
    print("| method | deletion AUC (lower better) | insertion AUC (higher better) | average drop % (lower) "
          "| increase in confidence % (higher) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} | {r['average_drop']:.1f} "
              f"| {r['increase']:.1f} |")
    with open(a.json, "w") as f:
        json.dump({"steps": a.steps, "threads": a.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
