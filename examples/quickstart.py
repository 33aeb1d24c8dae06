"""Quickstart: Grad-CAM maps for 2 images x 3 classes in one call.

Run: python examples/quickstart.py   (CPU, a few seconds; random weights, no downloads)
"""
import timm
import torch

import funcam

torch.manual_seed(0)
model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
x = torch.rand(2, 3, 224, 224)                       # a batch of B=2 images

split = funcam.split(model)                          # extract = forward_features, head = forward_head
funcam.check_split(split, x, model)                  # head(extract(x)) == model(x), gradients reach the maps
out = funcam.cam(split, x, classes=[0, 3, 7])        # K=3 classes: one forward + one vmapped vjp
heat = funcam.normalize(funcam.upsample(out.maps, x.shape[-2:]))  # (B, K, H, W), each map in [0, 1]
top2 = funcam.gradcam(split, x, top_k=2)             # the 2 highest-scoring classes of each image

print("raw maps (B, K, h, w):", tuple(out.maps.shape), " logits:", tuple(out.logits.shape))
print("heatmaps (B, K, H, W):", tuple(heat.shape), " top-2 maps:", tuple(top2.shape))
for b, (cls, hm) in enumerate(zip(out.classes, heat)):
    peaks = [divmod(int(i), x.shape[-1]) for i in hm.flatten(1).argmax(1)]
    print(f"image {b}: classes {cls.tolist()}, heatmap peaks (row, col) {peaks}")
print("quickstart OK")
