"""funcam's random-logit test and MPRT family against Quantus 0.6 itself (its layer resets reproduced exactly, its
numpy draws shared); the randomised models run through functional_call, looped or vmapped over stacked states."""
from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from quantus.helpers.model.pytorch_model import PyTorchModel

from funcam import metrics
from tests.core.quantus_oracle import (
    CLASSES,
    assert_parity,
    inputs,
    per_pair,
    quantus_saliency,
    quiet,
    saliency,
    tiny_model,
)

MODEL, X = tiny_model(), inputs()
NOISE = 0.01 * torch.rand(2, 2, 12, 12, generator=torch.Generator().manual_seed(3))  # no exact ties between maps
MAPS = saliency(MODEL, X, CLASSES).detach() + NOISE


def layer_scores(results) -> np.ndarray:
    return np.array([[[v[0] for v in r.values()] for r in row] for row in results])


def test_randomised_states_reproduce_quantus_layer_resets_without_touching_the_model():
    before = {k: v.clone() for k, v in MODEL.state_dict().items()}
    rng = torch.random.get_rng_state()
    states = list(metrics.randomised_states(MODEL))
    names, outs = metrics.randomised_outputs(MODEL, X, layer_order="top_down")
    assert torch.equal(torch.random.get_rng_state(), rng)  # forked: the global generator is left alone
    assert all(torch.equal(before[k], v) for k, v in MODEL.state_dict().items())
    assert names == [n for n, _ in metrics.randomisable_layers(MODEL)][::-1] == [n for n, _ in states]
    wrapped = PyTorchModel(MODEL, channel_first=True, softmax=False)
    for (name, ref), (mine, state), out in zip(wrapped.get_random_layer_generator(order="top_down", seed=42), states,
                                               outs):
        assert name == mine
        with torch.no_grad():
            expected = ref(X)
            torch.testing.assert_close(metrics.call_with(MODEL, state, lambda m, x: m(x), X), expected, rtol=0, atol=0)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # vmapped over stacked states


@pytest.mark.parametrize("options", [{}, {"layer_order": "bottom_up", "skip_layers": True},
                                     {"layer_order": "independent"}])
def test_mprt_equals_quantus(options):
    q = layer_scores(per_pair(quiet(quantus.MPRT, disable_warnings=True, **options), MODEL, X, MAPS, CLASSES,
                              explain_func=quantus_saliency))
    f = metrics.mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency, **options)
    assert f.layers[0] == "original" and f.scores.shape == q.shape
    assert_parity(f.scores, q)


def test_mprt_vmapped_over_stacked_states_equals_the_loop_and_quantus_averages():
    loop = metrics.mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency)
    vm = metrics.mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency, vmap=True, max_memory=1)
    torch.testing.assert_close(vm.scores, loop.scores, rtol=1e-5, atol=1e-6)
    q = np.array(per_pair(quiet(quantus.MPRT, return_average_correlation=True, disable_warnings=True), MODEL, X, MAPS,
                          CLASSES, explain_func=quantus_saliency))[..., 0]
    assert_parity(metrics.mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency, return_average_correlation=True), q)
    q = np.array(per_pair(quiet(quantus.MPRT, return_last_correlation=True, disable_warnings=True), MODEL, X, MAPS,
                          CLASSES, explain_func=quantus_saliency))[..., 0]
    assert_parity(metrics.mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency, return_last_correlation=True), q)


def test_random_logit_equals_quantus():
    np.random.seed(42)
    pick = np.random.randint(0, 4, 1)[0]  # Quantus reseeds 42 per call: the same offset for every pair
    off = torch.tensor([[[c for c in range(5) if c != int(y)][pick] for y in row] for row in CLASSES])
    q = np.array(per_pair(quiet(quantus.RandomLogit, num_classes=5, disable_warnings=True), MODEL, X, MAPS, CLASSES,
                          explain_func=quantus_saliency))[..., 0]
    f = metrics.random_logit(MODEL, X, MAPS, CLASSES, off_classes=off, explain_fn=saliency)
    assert_parity(f, q)
    drawn = metrics.random_logit(MODEL, X, MAPS, CLASSES, explain_fn=saliency,
                                 generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 2) and torch.isfinite(drawn).all()


def test_efficient_mprt_equals_quantus():
    q = np.array(per_pair(quiet(quantus.EfficientMPRT, disable_warnings=True), MODEL, X, MAPS, CLASSES,
                          explain_func=quantus_saliency))[..., 0]
    assert_parity(metrics.efficient_mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency), q)


def test_smooth_mprt_equals_quantus_on_its_draws():
    # Quantus' smooth MPRT explains through quantus.explain (here captum's Saliency: |gradient| summed over
    # channels, the same map as the saliency explainer); each model's noise is drawn in turn
    samples, models = 3, 1 + 4
    results, draws = [], []
    for b in range(2):
        np.random.seed(11 + b)
        draws.append(np.stack([np.stack([np.random.randn(1, 3, 12, 12)[0] for _ in range(samples - 1)])
                               for _ in range(models)]))
        results += per_pair(quiet(quantus.SmoothMPRT, nr_samples=samples, disable_warnings=True), MODEL, X[b:b + 1],
                            MAPS[b:b + 1], CLASSES[b:b + 1], seed=11 + b, explain_func=quantus_saliency,
                            explain_func_kwargs={"method": "Saliency"})
    f = metrics.smooth_mprt(MODEL, X, MAPS, CLASSES, nr_samples=samples, explain_fn=saliency,
                            draws=torch.tensor(np.stack(draws, 2)))
    assert_parity(f.scores, layer_scores(results))


def test_sanity_checks_separate_a_model_reading_map_from_a_model_free_one():
    sal = metrics.mprt(MODEL, X, MAPS, CLASSES, explain_fn=saliency, return_last_correlation=True)
    edges = metrics.sobel_maps(None, X, CLASSES)
    sob = metrics.mprt(MODEL, X, edges, CLASSES, explain_fn=metrics.sobel_maps, return_last_correlation=True)
    torch.testing.assert_close(sob, torch.ones_like(sob))  # randomising the model cannot change an edge map
    assert (sal < 0.9).all()
    same = metrics.random_logit(MODEL, X, edges, CLASSES, explain_fn=metrics.sobel_maps)
    torch.testing.assert_close(same, torch.ones_like(same))
