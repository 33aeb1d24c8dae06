"""funcam: class activation maps for B images x K classes in one call, built on torch.func.

>>> import timm, torch, funcam
>>> model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
>>> maps = funcam.gradcam(funcam.split(model), torch.randn(2, 3, 64, 64), torch.tensor([3, 7]))
>>> maps.shape  # (B, K, h, w) at feature resolution
torch.Size([2, 2, 2, 2])
"""
from funcam._src.core.cams import (
    METHODS,
    argmax_channel,
    cam,
    chefer_relevance,
    elementwise,
    grad_rollout,
    gradcam,
    gradcam_max,
    gradcampp,
    gradient_shap,
    guided_backprop,
    guided_gradcam,
    hirescam,
    input_x_gradient,
    integrated_gradients,
    layercam,
    occlusion,
    rollout,
    saliency,
    smoothgrad,
    vargrad,
    xgradcam,
)
from funcam import explain, metrics  # funcam.explain.explain(model, x, method=...) after a plain import
from funcam._src.app.dataset import explain_dataset, load_maps
from funcam._src.guard import TrainingModeWarning
from funcam._src.core.postprocess import fuse, normalize, upsample
from funcam._src.core.rollout import attention_rollout, block_attentions, rollout_matrix
from funcam._src.base import CAM, Features, Split
from funcam._src.core.split import check_split, split

from funcam._src.base import __version__

__all__ = [
    "CAM",
    "Features",
    "METHODS",
    "Split",
    "TrainingModeWarning",
    "argmax_channel",
    "attention_rollout",
    "block_attentions",
    "cam",
    "chefer_relevance",
    "check_split",
    "elementwise",
    "explain_dataset",
    "fuse",
    "gradcam",
    "gradcam_max",
    "gradcampp",
    "grad_rollout",
    "gradient_shap",
    "guided_backprop",
    "guided_gradcam",
    "hirescam",
    "input_x_gradient",
    "integrated_gradients",
    "layercam",
    "load_maps",
    "metrics",
    "normalize",
    "occlusion",
    "rollout",
    "rollout_matrix",
    "saliency",
    "smoothgrad",
    "split",
    "upsample",
    "vargrad",
    "xgradcam",
]
