"""funcam's faithfulness correlation and monotonicity correlation against Quantus 0.6 itself on Quantus' own numpy
draws (numpy seeded per image; funcam given the same draws), and on deterministic baselines."""
from __future__ import annotations

import numpy as np
import quantus
import torch

from funcam import metrics
from tests.core.quantus_oracle import CLASSES, assert_parity, inputs, per_pair, quiet, random_maps, tiny_model, values

MODEL, X, MAPS = tiny_model(), inputs(), random_maps()
F = 3 * 12 * 12


def test_faithfulness_correlation_equals_quantus_on_its_draws():
    runs, size = 12, 20
    draws = []
    for b in range(2):
        np.random.seed(100 + b)
        subsets = []
        for _ in range(runs):
            subsets.append(np.random.choice(F, size, replace=False))
            np.random.uniform(size=1)  # Quantus' baseline lookup draws one 'uniform' value per call, used or not
        draws.append(np.stack(subsets))
    q = values(per_pair(quiet(quantus.FaithfulnessCorrelation, nr_runs=runs, subset_size=size, return_aggregate=False,
                              disable_warnings=True), MODEL, X, MAPS, CLASSES, seed=100, softmax=False))
    f = metrics.faithfulness_correlation(MODEL, X, MAPS, CLASSES, nr_runs=runs, subset_size=size,
                                         draws=torch.tensor(np.stack(draws, 1)))
    assert f.abs().max() > 0
    assert_parity(f, q)


def test_faithfulness_correlation_generator_is_reproducible():
    a = metrics.faithfulness_correlation(MODEL, X, MAPS, CLASSES, nr_runs=8, subset_size=20,
                                         generator=torch.Generator().manual_seed(3))
    b = metrics.faithfulness_correlation(MODEL, X, MAPS, CLASSES, nr_runs=8, subset_size=20,
                                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_monotonicity_correlation_equals_quantus_on_its_uniform_draws():
    step, samples = 24, 3
    draws = []
    for b in range(2):
        np.random.seed(100 + b)
        draws.append(np.random.uniform(0, 1, size=(F // step, samples)))  # one value per step and sample, in order
    q = values(per_pair(quiet(quantus.MonotonicityCorrelation, nr_samples=samples, features_in_step=step,
                              disable_warnings=True), MODEL, X, MAPS, CLASSES, seed=100, softmax=True))
    f = metrics.monotonicity_correlation(MODEL, X, MAPS, CLASSES, nr_samples=samples, features_in_step=step,
                                         draws=torch.tensor(np.stack(draws, -1)))
    assert_parity(f, q)


def test_monotonicity_correlation_equals_quantus_on_a_deterministic_baseline():
    q = values(per_pair(quiet(quantus.MonotonicityCorrelation, nr_samples=2, features_in_step=24,
                              perturb_baseline="black", disable_warnings=True), MODEL, X, MAPS, CLASSES, softmax=True))
    assert_parity(metrics.monotonicity_correlation(MODEL, X, MAPS, CLASSES, nr_samples=2, features_in_step=24,
                                                   perturb_baseline="black"), q)
