"""funcam's existing ROAD against Quantus 0.6 where the definitions meet: the noisy linear imputation itself.

Quantus' ROAD differs beyond that: it scores whether the top-1 class survives (an accuracy per percentage), ranks
the ``C*H*W`` broadcast features (so top-k may take some channels of a pixel; its imputation then indexes pixels
with feature indices and fails for C > 1), and takes ``int(H*W*p/100)`` of them; funcam's ``road`` reports the
class score change and removes the pixels at or above the map's (100 - p)-th percentile.
"""
from __future__ import annotations

import numpy as np
import torch
from quantus.functions.perturb_func import noisy_linear_imputation

from funcam import metrics
from tests.core.quantus_oracle import inputs, quiet


def test_impute_equals_quantus_noisy_linear_imputation_without_noise():
    x = inputs(size=10, batch=1).double()
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    for count in (5, 40, 90):
        missing = torch.zeros(100, dtype=torch.bool)
        missing[order[:count]] = True
        ref = quiet(noisy_linear_imputation, x[0].numpy(), order[:count].numpy(), noise=0.0)
        got = metrics.impute(x, missing.view(1, 10, 10), tol=1e-12)
        assert not torch.equal(got, x)
        np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-8, atol=1e-8)
