"""Small, fast versions of the quality benchmarks: a regression in the maps drops these scores to the
baselines (chance 0.25 on mosaics, about 0.1-0.2 for random / centre maps on digits)."""
from __future__ import annotations

import pytest
import torch

from benchmarks import _digits, quality_digits, quality_faithfulness, quality_mosaic


@pytest.fixture(scope="module")
def tiny_cnn():
    torch.set_num_threads(1)
    # trained here (about 25-50 s on one thread), never read from benchmarks/cache
    return _digits.load_or_train("tiny-cnn", "single", cache=False)


@pytest.mark.slow  # trains a network first (about 20-50 s)
def test_digits_tiny_cnn_points_at_the_digit(tiny_cnn):
    data = _digits.make_canvases(100, task="single", split="test", seed=7)
    assert _digits.accuracy(tiny_cnn, data) > 0.6
    rows = quality_digits.evaluate(tiny_cnn, data, ("gradcam", "gradcampp"))
    assert rows["gradcam"]["pointing"] >= 0.8, rows
    assert rows["gradcampp"]["pointing"] >= 0.8, rows
    assert rows["random"]["pointing"] < 0.3 and rows["centre"]["pointing"] < 0.4, rows
    assert rows["gradcam"]["energy"] > 2 * rows["random"]["energy"], rows


@pytest.mark.slow  # trains a ViT first (about 40-60 s)
def test_digits_tiny_vit_relevance_points_at_the_digit():
    # A 2-block ViT trained here for 300 steps (about a minute on one thread): it already finds the digit
    # (its accuracy is still low), and the maps must show it.
    torch.set_num_threads(1)
    model = _digits.load_or_train("tiny-vit", "single", cache=False)
    data = _digits.make_canvases(100, task="single", split="test", seed=7)
    rows = quality_digits.evaluate(model, data, ("rollout", "chefer"))
    # measured 0.92 for both; random maps 0.05, the centre prior 0.21, the untrained network 0.12
    assert rows["rollout"]["pointing"] >= 0.8 and rows["chefer"]["pointing"] >= 0.8, rows
    assert rows["random"]["pointing"] < 0.3 and rows["centre"]["pointing"] < 0.4, rows


def test_digits_canvases_are_reproducible_and_boxes_hold_the_digits():
    a = _digits.make_canvases(20, task="pair", split="test", seed=3)
    b = _digits.make_canvases(20, task="pair", split="test", seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.boxes, b.boxes)
    assert (a.labels[:, 0] != a.labels[:, 1]).all()
    side = a.boxes[..., 2] - a.boxes[..., 0]
    assert set(side.unique().tolist()) <= set(_digits.SCALES)
    for i in range(20):
        for k in range(2):
            x0, y0, x1, y1 = a.boxes[i, k].tolist()
            assert a.x[i, 0, y0:y1, x0:x1].sum() > 5  # ink inside each box


@pytest.mark.slow  # a quality benchmark in small (real weights, 20-35 s under load)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mosaic_gradcam_finds_each_tile_and_equals_pytorch_grad_cam():
    torch.set_num_threads(1)
    rows = quality_mosaic.run(2, methods=("gradcam",))
    assert rows["gradcam"]["pointing"] >= 0.75, rows  # chance 0.25
    assert rows["gradcam"]["pointing"] == rows["pytorch-grad-cam gradcam"]["pointing"], rows
    assert abs(rows["gradcam"]["energy"] - rows["pytorch-grad-cam gradcam"]["energy"]) < 0.01, rows
    assert rows["gradcam"]["energy"] > rows["uniform noise"]["energy"] + 0.2, rows


@pytest.mark.slow  # a quality benchmark in small (deletion / insertion curves, 10-35 s)
def test_faithfulness_gradcam_beats_random_maps():
    torch.set_num_threads(1)
    rows = quality_faithfulness.run(steps=6, methods=("gradcam",))
    assert rows["gradcam"]["deletion_auc"] < rows["random (7x7)"]["deletion_auc"], rows
    assert rows["gradcam"]["insertion_auc"] > rows["random (7x7)"]["insertion_auc"], rows
    assert rows["gradcam"]["average_drop"] < rows["random (7x7)"]["average_drop"], rows


@pytest.mark.slow
def test_digits_vit_rollout_and_chefer_point_at_the_digit():
    torch.set_num_threads(1)
    model = _digits.load_or_train("vit", "single", steps=300, cache=False)
    data = _digits.make_canvases(100, task="single", split="test", seed=7)
    rows = quality_digits.evaluate(model, data, ("rollout", "chefer"))
    assert rows["rollout"]["pointing"] >= 0.8 and rows["chefer"]["pointing"] >= 0.7, rows
