"""The shared perturbation engine: attributions as Quantus prepares them, Quantus' patch grid, the running-mean
baseline against a sequential loop, the three perturbation modes, chunking under max_memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from quantus.functions.normalise_func import normalise_by_max
from quantus.helpers import utils as qutils

from funcam._src.core import evaluation as ev
from tests.core.quantus_oracle import CLASSES, inputs, random_maps, tiny_model

X, MAPS = inputs(), random_maps()


def test_attributions_normalise_per_map_then_abs_as_quantus_on_one_pair():
    a = ev.attributions(MAPS, X, abs=True, normalise=True)
    assert a.shape == (2, 2, 1, 12, 12) and a.dtype == torch.float64
    for b in range(2):
        for k in range(2):
            ref = np.abs(normalise_by_max(MAPS[b, k][None, None].numpy().astype(np.float64)))
            np.testing.assert_allclose(a[b, k].numpy(), ref[0], rtol=1e-12)
    zero = ev.attributions(torch.zeros(1, 1, 12, 12), X[:1], abs=False, normalise=True)
    assert not zero.any() and not torch.isnan(zero).any()


@pytest.mark.parametrize("size,patch", [(12, 4), (12, 5), (13, 4), (7, 3)])
def test_block_groups_are_quantus_patches(size, patch):
    pad = qutils.get_padding_size(size, patch)
    x = np.zeros((1, 1, size + sum(pad), size + sum(pad)))
    ids, n = ev.block_groups(size, size, patch, torch.device("cpu"))
    padded = np.full(x.shape[-2:], -1)
    for i, block in enumerate(qutils.get_block_indices(x, patch)):
        padded.flat[block[0]] = i
    expected = padded[pad[0]:pad[0] + size, pad[0]:pad[0] + size]
    assert n == len(list(qutils.get_block_indices(x, patch)))
    np.testing.assert_array_equal(ids.numpy(), expected)


def test_running_mean_fill_equals_a_sequential_loop():
    x = X[:1]
    groups = ev.rank_groups(torch.rand(1, 2, 432, generator=torch.Generator().manual_seed(0)), 7, descending=True)
    fill = ev.fill_values(x, groups, 62, "mean", "cumulative")
    for k in range(2):
        cur = x.flatten(1)[0].double().clone()
        for t in range(62):
            m = cur.mean()
            assert abs(float(fill[0, k, t]) - float(m)) < 1e-12
            cur[groups[0, k] == t] = m


def test_modes_replace_the_right_features():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    groups = torch.tensor([[0, 1, 2, 0, 1, 2]])
    fill = torch.tensor([[-1.0, -2.0, -3.0]])
    step = torch.tensor([1])
    values = ev.feature_values(groups, fill)
    assert values.tolist() == [[-1.0, -2.0, -3.0, -1.0, -2.0, -3.0]]
    assert ev.perturbed(x, groups, values, step, "cumulative").flatten().tolist() == [-1, -2, 2, -1, -2, 5]
    assert ev.perturbed(x, groups, values, step, "single").flatten().tolist() == [0, -2, 2, 3, -2, 5]
    assert ev.perturbed(x, groups, values, step, "insertion").flatten().tolist() == [0, 1, -3, 3, 4, -3]


def test_step_scores_chunked_equal_one_chunk():
    model = tiny_model()
    st = ev.setup(model, X, MAPS, CLASSES, abs=False, normalise=True, softmax=True)
    groups = ev.rank_groups(ev.flat_features(st.a, 3), 48, descending=True)
    fill = ev.fill_values(X, groups, 9, "black", "cumulative")
    whole = ev.step_scores(model, st, groups, fill, 9, "cumulative", softmax=True, max_memory=None)
    seen = []

    def counting(x):
        seen.append(x.shape[0])
        return model(x)

    chunked = ev.step_scores(counting, st, groups, fill, 9, "cumulative", softmax=True,
                             max_memory=5 * ev.FORWARD_BYTES_PER_INPUT_BYTE * 432 * 4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert max(seen) == 5 and sum(seen) == 2 * 2 * 9


def test_bad_maps_and_baselines_raise():
    with pytest.raises(ValueError, match="maps must be a floating"):
        ev.attributions(torch.zeros(2, 2, 12), X, abs=False, normalise=False)
    with pytest.raises(ValueError, match=r"C, H, W = \(3, 12, 12\)"):
        ev.attributions(torch.zeros(2, 2, 2, 12, 12), X, abs=False, normalise=False)
    with pytest.raises(ValueError, match="perturb_baseline"):
        ev.baseline_value(X, "grey")
    with pytest.raises(ValueError, match="x must be"):
        ev.check_x(torch.zeros(3, 12, 12))


class _ViewsItsInput(torch.nn.Module):
    """A conv net that calls ``.view`` on its input, which a channels-last tensor refuses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.fc = torch.nn.Linear(3 * 12 * 12, 5)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1)) + self.conv(x).mean(dim=(2, 3)).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("model", [tiny_model(), _ViewsItsInput().eval()], ids=["conv", "views-its-input"])
def test_predict_in_channels_last_equals_the_input_layout(model):
    """Scores of perturbed inputs handed to a conv net channels-last equal a plain loop over the inputs as they are
    (to float rounding); a model that refuses channels-last gets them in their own layout."""
    assert ev.prefers_channels_last(model, X)
    inputs = torch.randn(7, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    cls = torch.tensor([0, 1, 2, 3, 4, 0, 1])

    def make(j):
        return inputs[j], cls[j]

    got = ev.predict(model, make, 7, X, softmax=True, max_memory=3 * ev.FORWARD_BYTES_PER_INPUT_BYTE * 432 * 4)
    with torch.no_grad():
        want = torch.stack([model(inputs[i:i + 1]).softmax(-1)[0, cls[i]] for i in range(7)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not got.is_inference() and got.abs().sum() > 0
    assert not ev.prefers_channels_last(model, X[:, :1]) and not ev.prefers_channels_last(lambda x: x, X)
