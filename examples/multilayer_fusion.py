"""Multi-layer fusion: one forward and one vmapped vjp give a Grad-CAM per layer; the coarse last layer says
*what*, the finer middle layer adds *where* in more detail. Fusing the per-layer normalised maps (the
multi-layer recipe of LayerCAM, Jiang et al. 2021) keeps the object and gains the detail.

Run: python examples/multilayer_fusion.py   (CPU, a few seconds; EfficientNet-Lite0 ImageNet weights offline)
"""
import os
import tempfile

import torch

import funcam
from funcam.images import sample_images
from funcam.models import load_model, preprocess, unnormalize
from funcam.render import grid, overlay, save_png

model, pre = load_model("efficientnet_lite0")
photos = sample_images()
x = preprocess([photos["coffee"], photos["chelsea"]], pre)          # (2, 3, 224, 224)

split = funcam.split(model, layer=["blocks.4", "blocks.6"])          # 14x14 and 7x7 feature maps
out = funcam.cam(split, x, top_k=1)                                  # maps: a tuple, one (B, K, h, w) per layer
mid, last = out.maps
print("classes:", out.classes.flatten().tolist(), " maps:", tuple(mid.shape), tuple(last.shape))

fused = funcam.fuse(out.maps, size=x.shape[-2:], normalize_each=True)  # (2, 1, 224, 224)
# The oracle: the mean of the per-layer min-max normalised maps, each upsampled to the input size.
ref = torch.stack([funcam.upsample(funcam.normalize(m), x.shape[-2:]) for m in out.maps]).mean(0)
assert torch.allclose(fused, ref, atol=1e-5), (fused - ref).abs().max()
assert (fused.amax(dim=(2, 3)) > 0.5).all()

image = unnormalize(x, pre)
rows = torch.stack([overlay(image, m, alpha=0.5)[:, 0] for m in (mid, last, fused)], dim=1)  # (2, 3, 3, H, W)
picture = grid(rows, row_labels=["coffee", "chelsea"], col_labels=["blocks.4", "blocks.6", "fused"])
path = save_png(picture, os.path.join(tempfile.mkdtemp(), "multilayer_fusion.png"))
print("wrote", path)
print("multilayer_fusion OK")
