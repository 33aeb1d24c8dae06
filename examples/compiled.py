"""funcam under torch.compile(fullgraph=True): the whole CAM computation (forward, vjp, vmap over
classes, the Grad-CAM reduction, ReLU, upsampling, normalisation) traces into one graph, no graph breaks.

backend="aot_eager" traces and runs the graph without generating code, so this runs anywhere in seconds;
use the default backend ("inductor") for speed on a GPU.

Run: python examples/compiled.py
"""
import time

import timm
import torch

import funcam

torch.manual_seed(0)
model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
split = funcam.split(model)
x = torch.rand(2, 3, 128, 128)
classes = torch.tensor([[0, 3, 7], [1, 2, 9]])  # (B, K): different classes per image


def heatmaps(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    maps = funcam.gradcam(split, x, classes)                 # (B, K, h, w)
    return funcam.normalize(funcam.upsample(maps, x.shape[-2:]))


compiled = torch.compile(heatmaps, fullgraph=True, backend="aot_eager")

t0 = time.perf_counter()
got = compiled(x, classes)
t_first = time.perf_counter() - t0
want = heatmaps(x, classes)
err = (got - want).abs().max().item()
print(f"compiled heatmaps {tuple(got.shape)}, first call (trace + compile) {t_first:.1f} s")
print(f"max |compiled - eager| = {err:.2e}")
assert torch.allclose(got, want, atol=1e-5), err

# Same shapes: the compiled graph is reused, no retrace.
other = torch.rand(2, 3, 128, 128)
err2 = (compiled(other, classes) - heatmaps(other, classes)).abs().max().item()
print(f"second input, max |compiled - eager| = {err2:.2e}")
assert err2 < 1e-5
print("compiled OK")
