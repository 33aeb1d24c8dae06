"""Score-CAM, SS-CAM and IS-CAM (funcam/_src/core/perturbation.py) against pytorch-grad-cam's ScoreCAM and
torchcam's ScoreCAM / SSCAM / ISCAM on the same layer and inputs in float64, and K classes against a per-class loop.

resnet18 cut after layer1 (C = 64 channels, so 64 masked forwards per image) at 32 px keeps the peers' per-class
loops short."""
from __future__ import annotations

import copy

import pytest
import torch

import funcam
from tests.conftest import make_model, noised
from tests.core._peers import TOL, pgc_processed, pgc_run, quiet, rel_err

CLASSES = torch.tensor([[1, 3], [4, 1]])  # (B, K): per-image classes
SIZE = (32, 32)


@pytest.fixture(scope="module")
def setup(one_thread):
    model = noised(copy.deepcopy(make_model("resnet18", dtype=torch.float64)))
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x, funcam.split(model, "layer1")


def test_scorecam_equals_pytorch_grad_cam(setup):
    from pytorch_grad_cam import ScoreCAM
    model, x, sp = setup
    want = pgc_run(ScoreCAM, model, [model.layer1], x, CLASSES)
    maps = funcam.scorecam(sp, x, CLASSES)
    assert maps.shape == (2, 2, 8, 8) and bool((maps != 0).any())
    assert rel_err(pgc_processed(maps, SIZE), want) <= TOL


def _torchcam(cls, model, x, classes, seed=None, **kw):
    """torchcam's raw maps (ReLU'd, not normalised) (B, K, h, w), one call per class column, the global RNG
    seeded with ``seed`` before each. Built and run with float64 as the default dtype: its noise distribution takes
    the default dtype at construction, and funcam draws the noise in the input's dtype."""
    out = []
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with quiet(), cls(model, "layer1", input_shape=(3, *SIZE), **kw) as ext:
            for k in range(classes.shape[1]):
                scores = model(x)
                if seed is not None:
                    torch.manual_seed(seed)
                out.append(ext(class_idx=[int(c) for c in classes[:, k]], scores=scores, normalized=False)[0])
    finally:
        torch.set_default_dtype(default)
    return torch.stack(out, 1)


@pytest.mark.slow  # torchcam's Score-CAM twice more; Score-CAM's parity with pytorch-grad-cam stays fast
def test_iscam_of_one_sample_and_noiseless_sscam_are_torchcams_scorecam(setup):
    from torchcam.methods import ScoreCAM
    model, x, sp = setup
    want = _torchcam(ScoreCAM, model, x, CLASSES)
    for got in (funcam.iscam(sp, x, CLASSES, num_samples=1), funcam.sscam(sp, x, CLASSES, num_samples=1, std=0.0)):
        assert bool((got != 0).any()) and rel_err(got, want) <= TOL


@pytest.mark.slow  # num_samples x C masked forwards per call, twice; IS-CAM of one sample = Score-CAM is fast
def test_sscam_equals_torchcam(setup):
    from torchcam.methods import SSCAM
    model, x, sp = setup
    want = _torchcam(SSCAM, model, x, CLASSES, seed=7, num_samples=2, std=2.0)
    torch.manual_seed(7)
    got = funcam.sscam(sp, x, CLASSES, num_samples=2)
    assert bool((got != 0).any()) and rel_err(got, want) <= TOL
    # a generator seeded alike draws the same noise as the global one
    again = funcam.sscam(sp, x, CLASSES, num_samples=2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@pytest.mark.slow  # num_samples x C masked forwards per call
def test_iscam_equals_torchcam(setup):
    from torchcam.methods import ISCAM
    model, x, sp = setup
    want = _torchcam(ISCAM, model, x, CLASSES, num_samples=3)
    got = funcam.iscam(sp, x, CLASSES, num_samples=3)
    assert bool((got != 0).any()) and rel_err(got, want) <= TOL


def test_classes_at_once_equal_one_call_per_class(setup):
    model, x, sp = setup
    with torch.no_grad():
        both = funcam.cam(sp, x, CLASSES, method="scorecam", relu=False)
        loop = torch.cat([funcam.scorecam(sp, x, CLASSES[:, k:k + 1], relu=False) for k in range(2)], dim=1)
    assert both.classes.tolist() == CLASSES.tolist() and bool((both.maps != 0).any())
    torch.testing.assert_close(loop, both.maps, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # two more Score-CAM calls of 128 masked forwards each; K at once against a loop stays fast
def test_a_score_callable_and_one_channel_per_forward_give_the_same_maps(setup):
    model, x, sp = setup
    with torch.no_grad():
        both = funcam.scorecam(sp, x, CLASSES, relu=False)
        # a callable sees B images at a time (its per-image gather needs exactly B rows)
        called = funcam.scorecam(sp, x, lambda out: out.gather(1, CLASSES), relu=False)
        chunked = funcam.scorecam(sp, x, CLASSES, relu=False, max_memory=1)  # one channel per forward
    assert bool((both != 0).any())
    for got in (called, chunked):
        torch.testing.assert_close(got, both, rtol=1e-10, atol=1e-12)


def test_progress_bar_and_bad_options(setup, capsys):
    model, x, sp = setup
    funcam.scorecam(sp, x[:1], [1], progress=True)
    assert "scorecam" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        funcam.sscam(sp, x, [1], num_samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        funcam.sscam(sp, x, [1], generator=3)


@pytest.mark.slow  # a two-layer split captures the model first: about 5 s
def test_a_split_at_two_layers_is_refused_before_any_work(setup):
    model, x, sp = setup
    two = funcam.split(model, ["layer1", "layer2"])

    def extract(_):
        raise AssertionError("the split's extract ran before the refusal")

    for split in (two, two._replace(extract=extract)):
        with pytest.raises(ValueError, match=r"scorecam takes a split at one layer, got one at \['layer1', 'layer2'\]"):
            funcam.scorecam(split, x, [1])
