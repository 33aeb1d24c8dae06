"""Quantus 0.6 as the oracle of the metric tests: a tiny float32 model, inputs, a torch.func saliency explainer, and
Quantus called once per (image, class) pair on the same map (Quantus scores one target per sample).

Quantus feeds the model ``torch.Tensor(x)``, i.e. float32, so the oracle model is float32: funcam and Quantus run
the same float32 forward on bit-identical perturbed inputs (Quantus builds them in float64 from float32 values and
casts back), in different batch compositions, so scores agree to float32 rounding (~1e-7 relative); the tests
assert the issue's 1e-4.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

B, K, N = 2, 2, 5
CLASSES = torch.tensor([[1, 3], [0, 4]])


def tiny_model(channels: int = 3, classes: int = N, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-conv-ReLU-pool-linear in eval mode, batch-norm statistics and affine terms non-trivial."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m[1].running_mean.normal_(generator=g)
        m[1].running_var.uniform_(0.5, 2.0, generator=g)
        m[1].weight.normal_(generator=g)
        m[1].bias.normal_(generator=g)
    return m


def inputs(size: int = 12, channels: int = 3, seed: int = 0, batch: int = B) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def random_maps(size: int = 12, seed: int = 1, batch: int = B, k: int = K) -> torch.Tensor:
    """Signed maps with distinct values (ties would leave Quantus' order to np.argsort)."""
    return torch.randn(batch, k, size, size, generator=torch.Generator().manual_seed(seed))


def saliency(model: Callable, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """|d score_k / d x| summed over channels ``(B, K, H, W)`` from one vjp vmapped over K one-hot cotangents:
    made of torch.func transforms only, so it also runs under vmap over parameter sets."""
    out, vjp = torch.func.vjp(model, x)
    cot = torch.nn.functional.one_hot(classes.T, out.shape[-1]).to(out.dtype)  # (K, B, N)
    return torch.func.vmap(vjp)(cot)[0].abs().sum(2).transpose(0, 1)


def quantus_saliency(model: Callable, inputs: np.ndarray, targets: np.ndarray, **kwargs: Any) -> np.ndarray:
    """The same explainer as Quantus' ``explain_func`` (one target per sample): ``(N, 1, H, W)``."""
    x = torch.as_tensor(inputs, dtype=torch.float32)
    return saliency(model, x, torch.as_tensor(targets).view(-1, 1)).detach().numpy()


def per_pair(metric: Any, model: nn.Module, x: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, *,
             masks: torch.Tensor | None = None, seed: int | None = None, **call: Any) -> np.ndarray:
    """Quantus' result for each (image, class) pair, ``(B, K, ...)`` float64; numpy reseeded with ``seed + b``
    before each pair of image b (so both classes of an image see the same draws), warnings silenced."""
    out = []
    for b in range(maps.shape[0]):
        row = []
        for k in range(maps.shape[1]):
            if seed is not None:
                np.random.seed(seed + b)
            extra = {} if masks is None else {"s_batch": masks[b, k][None, None].numpy().astype(np.float64)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = metric(model=model, x_batch=x[b:b + 1].numpy(), y_batch=classes[b, k:k + 1].numpy(),
                           a_batch=maps[b, k][None, None].numpy().astype(np.float64), **extra, **call)
            row.append(r)
        out.append(row)
    return out


def values(results: list) -> np.ndarray:
    """Per-pair results (each a list with one entry per sample) -> ``(B, K, ...)`` float64."""
    return np.array([[np.asarray(r[0], dtype=np.float64) for r in row] for row in results])


def assert_parity(f: torch.Tensor | np.ndarray, q: np.ndarray, rtol: float = 1e-4) -> None:
    """Relative error at most ``rtol``: elementwise, or against the largest value for values near zero; NaN
    where Quantus has NaN."""
    f = f.detach().double().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    assert f.shape == q.shape, (f.shape, q.shape)
    scale = np.nanmax(np.abs(q)) if np.isfinite(q).any() else 1.0
    np.testing.assert_allclose(f, q, rtol=rtol, atol=rtol * scale, equal_nan=True)


def quiet(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a peer with its own warnings silenced (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)
