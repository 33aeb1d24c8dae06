"""Post-processing against cv2 and hand computations."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import funcam


def test_upsample_equals_cv2_linear():
    maps = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    up = funcam.upsample(maps, (40, 56))
    for b in range(2):
        for k in range(3):
            ref = cv2.resize(maps[b, k].numpy(), (56, 40), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(up[b, k].numpy(), ref, atol=1e-5)


def test_normalize_per_map():
    maps = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]]])  # (1, 2, 2, 2)
    out = funcam.normalize(maps)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=1e-6, rtol=0)
    assert torch.count_nonzero(out[0, 1]) == 0  # constant map: zeros, not NaN


def test_relu_before_upsampling_keeps_negatives_out():
    """One large negative cell must not darken its neighbours: ReLU at feature resolution."""
    sp = funcam.Split(lambda x: x, lambda f: f.sum(dim=(2, 3)))
    x = torch.ones(1, 1, 3, 3)
    x[0, 0, 1, 1] = -100.0
    maps = funcam.gradcam(sp, x, [0])  # gradient 1 everywhere: map = A, ReLU'd at 3x3
    up = funcam.upsample(maps, (12, 12))
    assert float(up.min()) >= 0.0 and float(up.max()) == pytest.approx(1.0)
    torch.testing.assert_close(maps, torch.relu(x))
    # the other order: upsampling first spreads the -100 over its neighbours, which ReLU then zeroes
    bled = torch.relu(funcam.upsample(funcam.gradcam(sp, x, [0], relu=False), (12, 12)))
    assert int((bled == 0).sum()) > int((up == 0).sum())


def test_fuse_mean_max():
    a = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    b = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    ub = funcam.upsample(b, (4, 4))
    torch.testing.assert_close(funcam.fuse([a, b]), (a + ub) / 2)
    torch.testing.assert_close(funcam.fuse([a, b], mode="max"), torch.maximum(a, ub))
    na, nb = funcam.normalize(a), funcam.upsample(funcam.normalize(b), (8, 8))
    torch.testing.assert_close(funcam.fuse([a, b], size=(8, 8), normalize_each=True),
                               (funcam.upsample(na, (8, 8)) + nb) / 2)


def test_postprocess_errors():
    with pytest.raises(ValueError, match=r"maps must be a \(B, K, h, w\) tensor, got \(3, 4\)"):
        funcam.normalize(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="size must be an int or"):
        funcam.upsample(torch.zeros(1, 1, 2, 2), (0, 3))
    with pytest.raises(ValueError, match="mode must be 'mean' or 'max'"):
        funcam.fuse([torch.zeros(1, 1, 2, 2)], mode="sum")
    with pytest.raises(ValueError, match=r"maps must share \(B, K\)"):
        funcam.fuse([torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2)])
