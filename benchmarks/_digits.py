"""Digits on a cluttered canvas: data, a small CNN, a small hybrid ViT, training and checkpoint caching.

A scikit-learn 8x8 digit, scaled x2-3 (16-24 px), is pasted at a random place on a 64x64 canvas strewn
with fragments of other digits (clutter, so that "any ink" is not evidence). The single-digit task has one
digit (10-way softmax); the pair task has two different digits in disjoint boxes (10-way multi-label), and
each class's map must find its own digit. Digit instances are split train/test before pasting, so test
canvases show digits the model never saw.

    python -m benchmarks._digits --model vit --task pair          # train (or load) and report accuracy

Checkpoints are cached in ``benchmarks/cache/`` keyed by the configuration, so benchmarks train once.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CANVAS = 64
SCALES = (16, 20, 24)  # digit side in pixels: x2, x2.5, x3 of the 8x8 originals
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")


class Canvases(NamedTuple):
    """x: (n, 1, 64, 64) in [0, 1]; labels: (n, K) digit classes; boxes: (n, K, 4) as (x0, y0, x1, y1),
    end-exclusive pixel coordinates; K = 1 (single) or 2 (pair)."""
    x: Tensor
    labels: Tensor
    boxes: Tensor


@functools.lru_cache(maxsize=2)
def _pool(split: str) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Scaled digit images per scale ``(n, s, s)`` and their labels ``(n,)`` for ``split`` (70/30 by instance)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(1234).permutation(len(d.target))
    cut = int(0.7 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    imgs = torch.from_numpy(d.images[idx] / 16.0).float()[:, None]
    scaled = tuple(F.interpolate(imgs, size=(s, s), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
                   for s in SCALES)
    return scaled, d.target[idx].astype(np.int64)


def make_canvases(n: int, *, task: str = "single", split: str = "test", seed: int = 0,
                  clutter: int = 4) -> Canvases:
    """``n`` canvases for ``task`` ('single' or 'pair') from the ``split`` digits ('train' or 'test')."""
    if task not in ("single", "pair"):
        raise ValueError(f"task must be 'single' or 'pair', got {task!r}")
    scaled, labels = _pool(split)
    rng = np.random.default_rng(seed)
    k = 1 if task == "single" else 2
    x = np.zeros((n, CANVAS, CANVAS), np.float32)
    out_labels = np.zeros((n, k), np.int64)
    boxes = np.zeros((n, k, 4), np.int64)
    for i in range(n):
        canvas = x[i]
        # clutter first: a random quarter-to-half window of another digit, so no fragment is a whole digit
        for _ in range(clutter):
            si = rng.integers(len(SCALES))
            src = scaled[si][rng.integers(len(labels))]
            s = SCALES[si]
            fh, fw = rng.integers(s // 4, s // 2 + 1, size=2)
            fy, fx = rng.integers(0, s - fh + 1), rng.integers(0, s - fw + 1)
            py, px = rng.integers(0, CANVAS - fh + 1), rng.integers(0, CANVAS - fw + 1)
            np.maximum(canvas[py:py + fh, px:px + fw], src[fy:fy + fh, fx:fx + fw], out=canvas[py:py + fh, px:px + fw])
        placed: list[tuple[int, int, int, int]] = []
        chosen: list[int] = []
        while len(placed) < k:
            si = rng.integers(len(SCALES))
            j = rng.integers(len(labels))
            if labels[j] in chosen:
                continue
            s = SCALES[si]
            py, px = rng.integers(0, CANVAS - s + 1, size=2)
            box = (int(px), int(py), int(px + s), int(py + s))
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                continue
            # the digit replaces clutter inside its box, so the box holds exactly this digit
            canvas[py:py + s, px:px + s] = scaled[si][j]
            placed.append(box)
            chosen.append(int(labels[j]))
        out_labels[i] = chosen
        boxes[i] = placed
    return Canvases(torch.from_numpy(x)[:, None], torch.from_numpy(out_labels), torch.from_numpy(boxes))


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitCNN(nn.Module):
    """64x64 -> 16x16x64 features -> global average pool -> linear; timm's forward_features/forward_head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(_conv(1, w), nn.MaxPool2d(2), _conv(w, 2 * w), _conv(2 * w, 2 * w),
                                      nn.MaxPool2d(2), _conv(2 * w, 4 * w), _conv(4 * w, 4 * w))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, f: Tensor) -> Tensor:
        return self.fc(f.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _patchify(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 2, 2, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def digit_vit(num_classes: int = 10, *, dim: int = 64, depth: int = 4, heads: int = 4,
              stem: str = "local") -> nn.Module:
    """timm VisionTransformer with a conv stem (timm ``HybridEmbed``): 64x64 -> 8x8 tokens + CLS, CLS pooling.

    stem "local": a 3x3 conv, then three non-overlapping 2x2 stride-2 convs, so each token sees its own 8x8
    cell plus a 1 px margin (receptive field 10 px). stem "overlap": a 3x3 conv, then three 3x3 stride-2 convs
    (receptive field 17 px): a token next to a digit sees part of it, so token-grid maps can peak one token off.
    """
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    if stem == "local":
        backbone = nn.Sequential(_conv(1, 32), _patchify(32, 32), _patchify(32, 64), _patchify(64, 64))
    elif stem == "overlap":
        backbone = nn.Sequential(_conv(1, 32), _conv(32, 32, 2), _conv(32, 64, 2), _conv(64, 64, 2))
    else:
        raise ValueError(f"stem must be 'local' or 'overlap', got {stem!r}")
    embed = functools.partial(HybridEmbed, backbone=backbone)
    return VisionTransformer(img_size=CANVAS, patch_size=1, in_chans=1, num_classes=num_classes, embed_dim=dim,
                             depth=depth, num_heads=heads, mlp_ratio=2.0, global_pool="token", embed_layer=embed)


# name -> (builder, default steps {task: steps}, batch, lr); "tiny-*" are the fast variants the tests train.
CONFIGS = {
    "cnn": (lambda: DigitCNN(), {"single": 400, "pair": 600}, 64, 3e-3),
    "vit": (lambda: digit_vit(stem="local"), {"single": 2000, "pair": 2000}, 64, 1e-3),
    "vit-overlap": (lambda: digit_vit(stem="overlap"), {"single": 1000, "pair": 2000}, 64, 1e-3),
    "tiny-cnn": (lambda: DigitCNN(width=8), {"single": 250, "pair": 250}, 32, 5e-3),
    "tiny-vit": (lambda: digit_vit(dim=32, depth=2, heads=2, stem="local"), {"single": 300, "pair": 300}, 32, 2e-3),
}


def train(model: nn.Module, task: str, *, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0,
          log_every: int = 0) -> nn.Module:
    """AdamW with linear warm-up and cosine decay on freshly drawn training canvases; returns ``model.eval()``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        data = make_canvases(batch, task=task, split="train", seed=seed * 1_000_003 + step)
        logits = model(data.x)
        if task == "single":
            loss = F.cross_entropy(logits, data.labels[:, 0])
        else:
            target = torch.zeros_like(logits).scatter_(1, data.labels, 1.0)
            loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Canvases, *, batch: int = 256) -> float:
    """Single task: top-1 accuracy. Pair task: the top-2 classes are exactly the two digits."""
    hits = []
    for i in range(0, len(data.x), batch):
        logits = model(data.x[i:i + batch])
        top = logits.topk(data.labels.shape[1], dim=1).indices.sort(dim=1).values
        hits.append((top == data.labels[i:i + batch].sort(dim=1).values).all(dim=1))
    return torch.cat(hits).float().mean().item()


def cache_path(name: str, task: str, steps: int, seed: int) -> str:
    builder, _, batch, lr = CONFIGS[name]
    # the architecture's printout is part of the key: a changed model never loads an old checkpoint
    key = json.dumps([name, task, steps, seed, batch, lr, SCALES, CANVAS, "v1", str(builder())])
    return os.path.join(CACHE, f"{name}-{task}-{steps}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.pt")


def load_or_train(name: str, task: str, *, steps: int | None = None, seed: int = 0, cache: bool = True,
                  log_every: int = 0) -> nn.Module:
    """The trained ``name`` model for ``task`` (eval mode), from the cache or trained now (and cached)."""
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {sorted(CONFIGS)}, got {name!r}")
    builder, default_steps, batch, lr = CONFIGS[name]
    steps = default_steps[task] if steps is None else steps
    torch.manual_seed(seed)
    model = builder()
    path = cache_path(name, task, steps, seed)
    if cache and os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train(model, task, steps=steps, batch=batch, lr=lr, seed=seed, log_every=log_every)
    if cache:
        os.makedirs(CACHE, exist_ok=True)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description="train (or load) a digits model and report its test accuracy")
    p.add_argument("--model", default="cnn", choices=sorted(CONFIGS))
    p.add_argument("--task", default="single", choices=("single", "pair"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = load_or_train(a.model, a.task, steps=a.steps, log_every=50)
    acc = accuracy(model, make_canvases(1000, task=a.task, split="test", seed=999))
    print(f"{a.model} {a.task}: test accuracy {acc:.3f} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
