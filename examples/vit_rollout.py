"""Attention rollout, class-specific attention relevance and Guided Grad-CAM, without hooks.

* attention_rollout: one map per image (class-agnostic), from every block's attention recomputed from the
  block's own weights, so timm's fused attention is fine and nothing is registered on the model.
* grad_rollout / chefer_relevance: B images x K classes in one forward + one vmapped vjp.
* guided_backprop / guided_gradcam on a CNN with in-place ReLUs; the model is left untouched.

Run: python examples/vit_rollout.py   (CPU, random weights, a few seconds)
"""
import timm
import torch

import funcam
from funcam import attention_rollout, grad_rollout, guided_backprop, guided_gradcam, rollout_matrix

torch.manual_seed(0)
x = torch.rand(2, 3, 112, 112)
classes = torch.tensor([1, 4, 7])  # K=3 classes for both images

vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=112).eval()
maps = attention_rollout(vit, x, head_fusion="max", discard_ratio=0.9)
print(f"rollout {tuple(maps.shape)} (one class-agnostic map on the 7x7 patch grid; CLS and distillation tokens "
      f"are not pixels)")
r = rollout_matrix(vit, x, head_fusion="max", discard_ratio=0.9)  # (B, N, N), rows sum to 1
assert torch.allclose(r.sum(-1), torch.ones(2, 51), atol=1e-5)
assert torch.allclose(maps, r[:, 0, 2:].reshape(2, 1, 7, 7), atol=1e-6)

out = funcam.cam(vit, x, classes, method="chefer")  # CAM(maps (B, K, h, w), classes, logits)
g = grad_rollout(vit, x, classes)
print(f"chefer {tuple(out.maps.shape)}, grad rollout {tuple(g.shape)}, logits {tuple(out.logits.shape)}")
assert out.maps.shape == g.shape == (2, 3, 7, 7)

cnn = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
flags = [m.inplace for m in cnn.modules() if isinstance(m, torch.nn.ReLU)]
gb = guided_backprop(cnn, x, classes)               # (B, K, 3, H, W) input-space gradients
ggc = guided_gradcam(cnn, x, classes, layer="layer3")
print(f"guided backprop {tuple(gb.shape)}, guided Grad-CAM {tuple(ggc.shape)}")
assert flags == [m.inplace for m in cnn.modules() if isinstance(m, torch.nn.ReLU)] and all(flags)
assert all(not m._forward_hooks and not m._backward_hooks for m in cnn.modules())
print("vit_rollout OK")
