"""funcam's metrics against Quantus 0.6 on the same metric, images and maps: B = 4 images x K = 2 classes, side by side.

    python benchmarks/quantus_speed.py [--repeats 3] [--threads 1] [--quick]   # or: python -m benchmarks.quantus_speed

Quantus scores one target per sample, so it gets the B*K (image, class) pairs as one batch of 8 samples (its
``evaluate_batch`` vectorises over samples and loops over perturbation steps, one forward per step); funcam gets
``(B, K)`` maps and sends all B*K*steps perturbed inputs through the model in chunks of ``max_memory``. Both run
the same number of forward passes per image except where funcam shares an input between the K classes (infidelity:
its perturbations do not depend on the map). Each row: the median of ``--repeats`` timed calls after one warm-up,
the calls of the two libraries interleaved; ``max |diff|`` compares the two results of the same row. Prints
Markdown, writes JSON.

Each row also counts the model calls and images each library sends through the model (a counting wrapper, on the
warm-up call), and ``--forward-costs`` times one forward per image at Quantus' batch (B*K = 8) and at funcam's
chunk, in the input's layout and channels-last (funcam's on a multi-channel conv net), so that what is left of a gap
can be told apart: library overhead or the model's own forwards.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quantus  # noqa: E402

from benchmarks._machine import cpu_name  # noqa: E402
from funcam import metrics  # noqa: E402
from funcam._src.app.images import sample_images  # noqa: E402
from funcam._src.app.models import preprocess  # noqa: E402
from funcam._src.core.cams import gradcam  # noqa: E402
from funcam._src.core.evaluation import chunk_for  # noqa: E402
from funcam._src.core.postprocess import upsample  # noqa: E402
from funcam.models import load_model  # noqa: E402

B, K = 4, 2


def lenet() -> nn.Module:
    """Quantus' tutorial model shape (LeNet on 28 x 28 grey digits), random weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10)).eval()


def setups(quick: bool) -> dict:
    """name -> (model, x (B, C, H, W), maps (B, K, H, W) or (B, K, C, H, W), classes (B, K), {metric: (funcam
    kwargs, Quantus class, Quantus kwargs, Quantus call kwargs)})."""
    out = {}
    model = lenet()
    x = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    maps = torch.rand(B, K, 28, 28, generator=torch.Generator().manual_seed(1))
    out["LeNet 1x28x28 (random weights)"] = (model, x, maps, classes, {
        "pixel_flipping": ({"features_in_step": 28}, quantus.PixelFlipping, {"features_in_step": 28},
                           {"softmax": True}),
        "region_perturbation": ({"patch_size": 4, "regions_evaluation": 49}, quantus.RegionPerturbation,
                                {"patch_size": 4, "regions_evaluation": 49}, {"softmax": True}),
        "infidelity": ({"perturb_patch_sizes": [4], "n_perturb_samples": 1}, quantus.Infidelity,
                       {"perturb_patch_sizes": [4], "n_perturb_samples": 1}, {"softmax": False}),
    })
    if quick:
        return out
    model, cfg = load_model("efficientnet_lite0")
    photos = sample_images()
    x = preprocess([photos[k] for k in sorted(photos)][:B], cfg)
    with torch.no_grad():
        classes = model(x).topk(K, dim=1).indices
    maps = upsample(gradcam(model, x, classes).detach(), x.shape[-2:])
    # Ties: ReLU'd CAMs are 0 on whole regions, and a map per pixel gives its C channels one value, which Quantus'
    # steps split (it asks the step to divide H*W = 50176 = 2^10 * 7^2, never a multiple of 3). np.argsort orders
    # tied values as its sort algorithm happens to, funcam in flat order: the maps are given per channel
    # (B, K, 3, H, W) with a 1e-6 relative jitter, so that every rank is unique and both perturb the same features.
    maps = maps.unsqueeze(2).expand(B, K, 3, *maps.shape[-2:])
    maps = maps + 1e-6 * maps.amax() * torch.rand(maps.shape, generator=torch.Generator().manual_seed(2))
    step = 224 * 14  # divides H*W as Quantus asks: 48 steps of 3136 of the 150528 features
    out["EfficientNet-Lite0 3x224x224, Grad-CAM maps"] = (model, x, maps, classes, {
        "pixel_flipping": ({"features_in_step": step}, quantus.PixelFlipping, {"features_in_step": step},
                           {"softmax": True}),
        "region_perturbation": ({"patch_size": 16, "regions_evaluation": 48}, quantus.RegionPerturbation,
                                {"patch_size": 16, "regions_evaluation": 48}, {"softmax": True}),
        "infidelity": ({"perturb_patch_sizes": [32], "n_perturb_samples": 1}, quantus.Infidelity,
                       {"perturb_patch_sizes": [32], "n_perturb_samples": 1}, {"softmax": False}),
    })
    return out


class Counting(nn.Module):
    """The model, counting its calls and the images it is given."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls, self.images = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return self.model(x)


def counted(call, model: nn.Module) -> tuple[tuple[int, int], object]:
    """((model calls, images), result) of ``call(model)``."""
    c = Counting(model).eval()
    out = call(c)
    return (c.calls, c.images), out


def forward_costs(model: nn.Module, x: torch.Tensor, chunk: int, repeats: int) -> dict:
    """Milliseconds per image of one no-grad forward at Quantus' batch (B*K) and at funcam's chunk, in x's layout and
    channels-last: the median of ``repeats`` after one warm-up."""
    out = {}
    for batch in sorted({B * K, chunk}):
        xs = x.repeat((batch + B - 1) // B, 1, 1, 1)[:batch]
        for layout in ("contiguous", "channels_last"):
            xl = xs.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else xs
            times = []
            with torch.inference_mode():
                for _ in range(repeats + 1):
                    t0 = time.perf_counter()
                    model(xl)
                    times.append(time.perf_counter() - t0)
            out[f"batch {batch}, {layout}"] = 1e3 * statistics.median(times[1:]) / batch
    return out


def _funcam(name, options, model, *, x, maps, classes) -> torch.Tensor:
    return getattr(metrics, name)(model, x, maps, classes, **options)


def _quantus(cls, options, call, model, *, x, maps, classes) -> np.ndarray:
    metric = cls(disable_warnings=True, **options)
    xq = x.repeat_interleave(K, 0).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = metric(model=model, x_batch=xq, y_batch=classes.reshape(-1).numpy(),
                   a_batch=maps.reshape(B * K, -1, *x.shape[-2:]).numpy(), batch_size=64, **call)
    return np.asarray(r, dtype=np.float64)


def run(*, repeats: int = 3, quick: bool = False) -> list[dict]:
    rows = []
    for setup, (model, x, maps, classes, table) in setups(quick).items():
        for name, (options, qcls, qoptions, qcall) in table.items():
            mine = functools.partial(_funcam, name, options, x=x, maps=maps, classes=classes)
            theirs = functools.partial(_quantus, qcls, qoptions, qcall, x=x, maps=maps, classes=classes)
            # the warm-up: the two results compared, and the model calls counted
            (fc, f), (qc, q) = counted(mine, model), counted(theirs, model)
            mine, theirs = functools.partial(mine, model), functools.partial(theirs, model)
            diff = float(np.nanmax(np.abs(f.double().numpy().reshape(q.shape) - q)))
            times = {"funcam": [], "quantus": []}
            for _ in range(repeats):
                for who, call in (("funcam", mine), ("quantus", theirs)):
                    t0 = time.perf_counter()
                    call()
                    times[who].append(time.perf_counter() - t0)
            fm, qm = statistics.median(times["funcam"]), statistics.median(times["quantus"])
            rows.append({"setup": setup, "metric": name, "funcam_s": fm, "quantus_s": qm, "speedup": qm / fm,
                         "max_abs_diff": diff, "max_abs_value": float(np.nanmax(np.abs(q))),
                         "funcam_forwards": fc, "quantus_forwards": qc, "times": times, "options": options})
            print(f"{setup} {name}: funcam {fm:.3f} s, Quantus {qm:.3f} s, x{qm / fm:.1f}, |diff| {diff:.1e}",
                  file=sys.stderr)
    return rows


def costs(rows: list[dict], *, repeats: int, quick: bool) -> dict:
    """setup -> forward_costs at funcam's chunk (``evaluation.chunk_for``) for the most perturbed inputs of a row
    (the images funcam sent, less the B clean ones)."""
    out = {}
    for setup, (model, x, *_) in setups(quick).items():
        n = max(r["funcam_forwards"][1] for r in rows if r["setup"] == setup) - B
        out[setup] = forward_costs(model, x, chunk_for(x, n, None), repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the LeNet setup only, one repeat")
    p.add_argument("--forward-costs", action="store_true", help="also time one forward per image at each batch")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantus_speed.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(repeats=1 if a.quick else a.repeats, quick=a.quick)
    print(f"\n### funcam vs Quantus {quantus.__version__}, B = {B} images x K = {K} classes, {a.threads} thread(s), "
          f"{cpu_name()}\n")
    print("| setup | metric | funcam (s) | Quantus (s) | speed-up | max abs diff (max abs value) "
          "| model calls (images): funcam / Quantus |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        (fc, fi), (qc, qi) = r["funcam_forwards"], r["quantus_forwards"]
        print(f"| {r['setup']} | {r['metric']} | {r['funcam_s']:.3f} | {r['quantus_s']:.3f} | {r['speedup']:.1f}x "
              f"| {r['max_abs_diff']:.1e} ({r['max_abs_value']:.2g}) | {fc} ({fi}) / {qc} ({qi}) |")
    per_image = costs(rows, repeats=1 if a.quick else a.repeats, quick=a.quick) if a.forward_costs else {}
    if per_image:
        print("\n| setup | batch, layout | ms per image (one forward) |\n|---|---|---:|")
        for setup, c in per_image.items():
            for what, ms in c.items():
                print(f"| {setup} | {what} | {ms:.2f} |")
    with open(a.json, "w") as f:
        json.dump({"threads": a.threads, "repeats": a.repeats, "torch": torch.__version__,
                   "quantus": quantus.__version__, "cpu": cpu_name(), "rows": rows, "forward_ms_per_image": per_image},
                  f, indent=1)


if __name__ == "__main__":
    main()
