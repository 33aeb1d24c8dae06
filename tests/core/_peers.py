"""What the tests of the perturbation and projection CAMs share: pytorch-grad-cam run once per class column, its
post-processing applied to funcam's maps, and the relative error they are held to."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch

import funcam

TOL = 1e-5  # relative to the largest value of the reference


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want must not be all zero)."""
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = want.abs().max().item()
    assert scale > 0, "the reference is all zero: the comparison would be vacuous"
    return ((got.detach().to(torch.float64) - want).abs().max() / scale).item()


@contextlib.contextmanager
def quiet():
    """A peer's own warnings and progress bars, kept out of the test's output (warnings are errors in the suite)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def pgc_run(cam_class, model, layers, x, classes, targets=None, **call):
    """pytorch-grad-cam's ``cam_class`` once per class column of ``classes (B, K)`` (per-image targets): its
    outputs ``(B, K, H, W)``. ``targets(c)`` builds a target (default ``ClassifierOutputTarget``)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    make = targets or ClassifierOutputTarget
    out = []
    with quiet(), cam_class(model=model, target_layers=layers) as cam:
        for k in range(classes.shape[1]):
            out.append(cam(input_tensor=x, targets=[make(int(c)) for c in classes[:, k]], **call))
    return torch.from_numpy(np.stack(out, 1))


def pgc_processed(maps: torch.Tensor, size) -> torch.Tensor:
    """pytorch-grad-cam's post-processing of one layer's ReLU'd maps (B, K, h, w): min-max at feature resolution,
    bilinear resize to ``size`` (cv2's grid), min-max again."""
    return funcam.normalize(funcam.upsample(funcam.normalize(maps.detach()), size))
