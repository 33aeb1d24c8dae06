"""Maps for every class at once: B=4 images x K=1000 classes in one funcam call.

funcam runs one forward and one vjp of the head, vmapped over the K one-hot cotangents; the classic
way (and a hook-based CAM library called once per class) runs a forward and a backward per class. This script
times both on CPU (random weights, 128 px input), checks that they agree on the classes the loop computed, and
extrapolates the loop to 1000.

Run: python examples/many_classes.py
"""
import time

import timm
import torch

import funcam

torch.manual_seed(0)
B, K, SIZE, LOOP_K = 4, 1000, 128, 5

model = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()
x = torch.rand(B, 3, SIZE, SIZE)
split = funcam.split(model)
classes = torch.arange(K)


def naive_gradcam(k: int) -> torch.Tensor:
    """One class, the classic way: forward, backward to the features, weights = mean gradient."""
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    (g,) = torch.autograd.grad(logits[:, k].sum(), feats)
    return torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), feats)).detach()


def timed(fn, repeat=2):
    """(result, best wall time of `repeat` runs), after one untimed warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


maps, t_funcam = timed(lambda: funcam.gradcam(split, x, classes))
print(f"funcam.gradcam: best of 2, B={B} x K={K} maps {tuple(maps.shape)} in {t_funcam:.3f} s")

loop_classes = [int(c) for c in torch.randperm(K)[:LOOP_K]]
naive_gradcam(0)  # warm-up
t0 = time.perf_counter()
loop_maps = torch.stack([naive_gradcam(k) for k in loop_classes], dim=1)
t_loop = time.perf_counter() - t0
per_class = t_loop / LOOP_K
print(f"naive loop    : {LOOP_K} classes in {t_loop:.3f} s ({per_class * 1e3:.1f} ms/class)")
print(f"naive loop    : extrapolated to K={K}: {per_class * K:.1f} s")
print(f"speed-up      : {per_class * K / t_funcam:.0f}x")

err = (maps[:, loop_classes] - loop_maps).abs().max().item()
scale = loop_maps.abs().max().item()
print(f"max |funcam - loop| on the {LOOP_K} looped classes: {err:.2e} (map scale {scale:.2e})")
assert err <= 1e-5 * scale, "funcam and the autograd loop disagree"

# chunk_size bounds memory: at most chunk_size per-class gradients (B, C, h, w) exist at once.
t0 = time.perf_counter()
chunked = funcam.gradcam(split, x, classes, chunk_size=100)
t_chunked = time.perf_counter() - t0
assert torch.allclose(chunked, maps, atol=1e-6)
print(f"chunk_size=100: same maps in {t_chunked:.3f} s")
print("many_classes OK")
