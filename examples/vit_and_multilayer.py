"""Vision Transformers and multi-layer CAMs.

* A CLS-token ViT (timm's default global_pool='token'): split() cuts at norm1 of the last block, because
  after the last attention no patch token reaches the head (the norm2 gradient on patch tokens is zero).
* An average-pooled ViT with a CLS token and 4 register tokens: split() cuts at norm2 (the pre-FFN
  feature); the prefix tokens travel alongside the map and are held constant.
* A ResNet-18 cut after layer3 and layer4 with torch.fx, the two maps fused into one.

Run: python examples/vit_and_multilayer.py   (CPU, random weights, a few seconds)
"""
import timm
import torch

import funcam

torch.manual_seed(0)
x = torch.rand(2, 3, 112, 112)
classes = torch.tensor([1, 4, 7])  # K=3 classes for both images


# 1. CLS-token ViT: the head reads only the CLS token.
vit_cls = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=112).eval()
split = funcam.split(vit_cls)
funcam.check_split(split, x, vit_cls)          # head(extract(x)) == model(x), non-zero gradient at the map
maps = funcam.gradcam(split, x, classes)
print(f"ViT, global_pool={vit_cls.global_pool!r}: maps {tuple(maps.shape)} (a 7x7 patch grid)")
print(f"  cut at {split.layers}")               # ('blocks.11.norm1',)
try:
    funcam.split(vit_cls, token_cut="norm2")
except ValueError as e:                         # norm2 is refused: every map would be zero
    print(f"  split(model, token_cut='norm2') -> ValueError: {str(e)[:90]}...")

# 2. Average-pooled ViT with a CLS token and 4 registers (5 prefix tokens).
vit_avg = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=112,
                            global_pool="avg", reg_tokens=4).eval()
split = funcam.split(vit_avg)
funcam.check_split(split, x, vit_avg)
maps = funcam.gradcam(split, x, classes)
print(f"ViT, global_pool={vit_avg.global_pool!r}, {vit_avg.num_prefix_tokens} prefix tokens: "
      f"maps {tuple(maps.shape)}")
print(f"  cut at {split.layers}")               # ('blocks.11.norm2',)

# 3. Multi-layer: one forward, one vmapped vjp, a map per layer.
resnet = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
split = funcam.split(resnet, layer=["layer3", "layer4"])
funcam.check_split(split, x, resnet)
out = funcam.cam(split, x, classes)
m3, m4 = out.maps                               # a tuple for a multi-layer split
print(f"ResNet-18 layer3 maps {tuple(m3.shape)}, layer4 maps {tuple(m4.shape)}")
fused = funcam.normalize(funcam.fuse(out.maps, size=x.shape[-2:], normalize_each=True))
print(f"  fused (mean of per-layer normalised maps at input size): {tuple(fused.shape)}, "
      f"range [{fused.min():.2f}, {fused.max():.2f}]")
print("vit_and_multilayer OK")
