"""funcam's batched similarities against scipy and scikit-image, row by row."""
from __future__ import annotations

import numpy as np
import scipy.stats
import skimage.metrics
import torch

from funcam import metrics
from tests.core.quantus_oracle import quiet

R = np.random.RandomState(0)
A = R.randn(6, 40)
B = A + R.randn(6, 40)
A[1, :15] = A[1, 0]  # ties
B[2] = np.round(B[2])


def test_pearson_and_spearman_equal_scipy_with_ties():
    np.testing.assert_allclose(metrics.pearson(torch.tensor(A), torch.tensor(B)).numpy(),
                               [scipy.stats.pearsonr(a, b)[0] for a, b in zip(A, B)], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(metrics.spearman(torch.tensor(A), torch.tensor(B)).numpy(),
                               [scipy.stats.spearmanr(a, b)[0] for a, b in zip(A, B)], rtol=1e-12, atol=1e-14)


def test_correlation_of_a_constant_row_is_nan_as_scipy():
    const = torch.ones(40, dtype=torch.float64)
    assert np.isnan(quiet(scipy.stats.pearsonr, const.numpy(), B[0])[0])
    assert torch.isnan(metrics.pearson(const, torch.tensor(B[0]))) and torch.isnan(metrics.spearman(const, const))


def test_ssim_equals_skimage_on_1d_signals_as_quantus_calls_it():
    def ref(a, b):
        rng = float(abs(max(a.max(), b.max()) - min(a.min(), b.min())))
        return skimage.metrics.structural_similarity(a, b, data_range=rng)

    np.testing.assert_allclose(metrics.ssim(torch.tensor(A), torch.tensor(B)).numpy(),
                               [ref(a, b) for a, b in zip(A, B)], rtol=1e-12, atol=1e-14)
    a32, b32 = A.astype(np.float32), B.astype(np.float32)  # skimage filters float32 input in float32
    np.testing.assert_allclose(metrics.ssim(torch.tensor(a32), torch.tensor(b32)).numpy(),
                               [ref(a, b) for a, b in zip(a32, b32)], rtol=1e-6, atol=1e-6)
