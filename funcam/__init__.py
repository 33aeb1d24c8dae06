"""funcam: class activation maps for B images x K classes in one call, built on torch.func.

>>> import timm, torch, funcam
>>> model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
>>> maps = funcam.gradcam(funcam.split(model), torch.randn(2, 3, 64, 64), torch.tensor([3, 7]))
>>> maps.shape  # (B, K, h, w) at feature resolution
torch.Size([2, 2, 2, 2])
"""
from funcam import explain, metrics  # funcam.explain.explain(model, x, method=...) after a plain import
from funcam._src.app.dataset import DatasetJob, RunSummary, explain_dataset, prepare_dataset
from funcam._src.app.shards import DatasetError, MapShard, load_maps
from funcam._src.base import CAM, Features, Pooled, Split, __version__
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
from funcam._src.core.postprocess import fuse, normalize, upsample
from funcam._src.core.rollout import attention_rollout, block_attentions, rollout_matrix
from funcam._src.core.split import check_split, split
from funcam._src.cuts.capture import CaptureError
from funcam._src.guard import TrainingModeWarning, ZeroMapWarning

__all__ = [
    "CAM",
    "METHODS",
    "CaptureError",
    "DatasetError",
    "DatasetJob",
    "Features",
    "MapShard",
    "Pooled",
    "RunSummary",
    "Split",
    "TrainingModeWarning",
    "ZeroMapWarning",
    "__version__",
    "argmax_channel",
    "attention_rollout",
    "block_attentions",
    "cam",
    "chefer_relevance",
    "check_split",
    "elementwise",
    "explain",
    "explain_dataset",
    "fuse",
    "grad_rollout",
    "gradcam",
    "gradcam_max",
    "gradcampp",
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
    "prepare_dataset",
    "rollout",
    "rollout_matrix",
    "saliency",
    "smoothgrad",
    "split",
    "upsample",
    "vargrad",
    "xgradcam",
]
