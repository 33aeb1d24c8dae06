"""funcam: class activation maps for B images x K classes in one call, built on torch.func.

>>> import timm, torch, funcam
>>> model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
>>> maps = funcam.gradcam(funcam.split(model), torch.randn(2, 3, 64, 64), torch.tensor([3, 7]))
>>> maps.shape  # (B, K, h, w) at feature resolution
torch.Size([2, 2, 2, 2])
"""
from funcam.cams import (
    METHODS,
    argmax_channel,
    cam,
    elementwise,
    gradcam,
    gradcam_max,
    gradcampp,
    hirescam,
    layercam,
    xgradcam,
)
from funcam.grads import CAM
from funcam.postprocess import fuse, normalize, upsample
from funcam.split import Features, Split, check_split, split

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "Features",
    "METHODS",
    "Split",
    "argmax_channel",
    "cam",
    "check_split",
    "elementwise",
    "fuse",
    "gradcam",
    "gradcam_max",
    "gradcampp",
    "hirescam",
    "layercam",
    "normalize",
    "split",
    "upsample",
    "xgradcam",
]
