"""Mosaic pointing game on real photos with real weights: 2x2 mosaics (448x448) of four different bundled
photos, explained by EfficientNet-Lite0 for each tile's class; the map must peak in that tile's quadrant.

    python benchmarks/quality_mosaic.py [--n 40] [--threads 1]      # or: python -m benchmarks.quality_mosaic

A tile's class is its photo's own top-1 when classified alone; chance is 0.25. Baselines: uniform noise, a
centre prior, and Grad-CAM of the same architecture with random weights; pytorch-grad-cam's GradCAM and
GradCAM++ run on the same mosaics. Prints a Markdown table, writes JSON.
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
from funcam._src.app.models import resize_crop  # noqa: E402
from funcam._src.core.metrics import pointing_game  # noqa: E402
from funcam._src.core.postprocess import upsample  # noqa: E402
from funcam.metrics import energy_in_box
from funcam.models import load_model, preprocess

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise", "gradcam-max",
           "argmax-channel")
TILE = 224


def make_mosaics(n: int, *, seed: int = 0):
    """x (n, 3, 448, 448) normalised, classes (n, 4) per quadrant (TL, TR, BL, BR), boxes (n, 4, 4), model, cfg."""
    model, cfg = load_model()
    photos = sample_images()
    names = sorted(photos)
    with torch.no_grad():
        top1 = model(preprocess([photos[k] for k in names], cfg)).argmax(dim=1)
    label = dict(zip(names, top1.tolist()))
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    xs, classes = [], []
    for _ in range(n):
        pick = [names[i] for i in torch.randperm(len(names), generator=g)[:4].tolist()]
        tiles = []
        for name in pick:
            img = photos[name].float().div(255)
            h, w = img.shape[-2:]
            side = int(min(h, w) * (0.6 + 0.4 * torch.rand((), generator=g).item()))
            top = int(torch.randint(0, h - side + 1, (), generator=g))
            left = int(torch.randint(0, w - side + 1, (), generator=g))
            tile = resize_crop(img[:, top:top + side, left:left + side], TILE, 1.0, cfg.interpolation)
            if torch.rand((), generator=g).item() < 0.5:
                tile = tile.flip(-1)
            tiles.append((tile - mean) / std)
        xs.append(torch.cat([torch.cat(tiles[:2], dim=2), torch.cat(tiles[2:], dim=2)], dim=1))
        classes.append([label[p] for p in pick])
    quads = torch.tensor([[0, 0, TILE, TILE], [TILE, 0, 2 * TILE, TILE], [0, TILE, TILE, 2 * TILE],
                          [TILE, TILE, 2 * TILE, 2 * TILE]])
    return torch.stack(xs), torch.tensor(classes), quads.expand(n, 4, 4), model, label


def pgc_maps(method: str, model, x, classes) -> torch.Tensor:
    """pytorch-grad-cam at ``model.bn2`` (the end of forward_features, funcam's cut), (B, K, H, W) in [0, 1]."""
    import warnings

    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}[method]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cls(model=model, target_layers=[model.bn2]) as cam:
            for k in range(classes.shape[1]):
                out.append(torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c))
                                                                         for c in classes[:, k]])))
    return torch.stack(out, 1)


def scores(maps: torch.Tensor, boxes: torch.Tensor) -> dict[str, float]:
    return {"pointing": pointing_game(maps, boxes).float().mean().item(),
            "energy": energy_in_box(maps, boxes).mean().item()}


def run(n: int, *, seed: int = 0, batch: int = 4, methods=METHODS, pgc: bool = True) -> dict[str, dict]:
    x, classes, boxes, model, _ = make_mosaics(n, seed=seed)
    size = x.shape[-2:]
    rows = {}
    for name in methods:
        t0 = time.perf_counter()
        maps = torch.cat([upsample(explain(model, x[i:i + batch], method=name, classes=classes[i:i + batch]).maps
                                   .detach(), size) for i in range(0, n, batch)])
        rows[name] = scores(maps, boxes) | {"seconds": time.perf_counter() - t0}
        if pgc and name in ("gradcam", "gradcampp"):
            ref = torch.cat([pgc_maps(name, model, x[i:i + batch], classes[i:i + batch]) for i in range(0, n, batch)])
            rows[f"pytorch-grad-cam {name}"] = scores(ref, boxes)
    import timm

    torch.manual_seed(seed)
    untrained = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    maps = torch.cat([upsample(explain(untrained, x[i:i + batch], method="gradcam", classes=classes[i:i + batch])
                               .maps.detach(), size) for i in range(0, n, batch)])
    rows["untrained network (gradcam)"] = scores(maps, boxes)
    g = torch.Generator().manual_seed(seed)
    rows["uniform noise"] = scores(torch.rand(n, 4, *size, generator=g), boxes)
    ys = torch.arange(size[0]).view(-1, 1) - (size[0] - 1) / 2
    xs = torch.arange(size[1]).view(1, -1) - (size[1] - 1) / 2
    # the exact centre is a corner of all four quadrants: its first maximum (row-major) lands in the top-left one
    centre = torch.exp(-(ys ** 2 + xs ** 2) / (2 * 100.0 ** 2)).expand(n, 4, *size)
    rows["centre prior"] = scores(centre.contiguous(), boxes)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40, help="number of mosaics")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_mosaic.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(a.n)
    print(f"\n### Mosaic pointing game, EfficientNet-Lite0, {a.n} mosaics x 4 tiles (chance 0.25)\n")
    print("| method | pointing | energy in quadrant |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['pointing']:.3f} | {r['energy']:.3f} |")
    with open(a.json, "w") as f:
        json.dump({"n": a.n, "threads": a.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
