"""``funcam evaluate``: the numbers it writes are ``funcam.metrics`` called directly on the same maps (the method's and
each baseline's), its errors are one ``funcam: error:`` line with exit code 2 and nothing written.

A tiny timm model (mobilenetv3_small_050, 10 classes, noised random weights) from a checkpoint, on two small
random images; commands run through ``tests/_cli_runner.py`` (one server imports torch once)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from funcam import metrics, upsample
from funcam._src.app.scoring import features_in_step
from funcam._src.cli.evaluate import names_from
from funcam._src.cli.options import UsageError
from funcam.explain import explain
from funcam.images import read_image
from funcam.models import load_model, preprocess
from tests._cli_runner import runner
from tests.conftest import noised

SMALL = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder with two images and one unreadable file, checkpoint path, its state dict)."""
    import timm
    from PIL import Image

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = noised(timm.create_model(SMALL, pretrained=False, num_classes=10))
    torch.save(model.state_dict(), d / "small.pt")
    imgs = d / "imgs"
    imgs.mkdir()
    g = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(g.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(imgs / f"{name}.png")
    (imgs / "notes.png").write_text("not an image\n")
    return imgs, d / "small.pt", model.state_dict()


def one_error(p, message: str) -> None:
    """Exit 2, stderr exactly ``funcam: error: <message>`` (a regex, matched whole)."""
    assert p.returncode == 2, p
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch("funcam: error: " + message, lines[0]), p


def reference(column: str, model, x, a, idx, steps: int) -> torch.Tensor:
    """The column ``(B, K)`` from ``funcam.metrics`` itself, with the options ``funcam evaluate`` documents."""
    if column == "pixel_flipping":
        return metrics.pixel_flipping(model, x, a, idx, features_in_step=features_in_step(x, steps),
                                      return_auc_per_sample=True)
    if column in ("deletion_auc", "insertion_auc"):
        return getattr(metrics.deletion_insertion(model, x, a, idx, steps=steps), column)
    if column == "region_perturbation":
        return metrics.region_perturbation(model, x, a, idx, patch_size=56, regions_evaluation=steps,
                                           return_auc_per_sample=True)
    assert column == "sparseness"
    return metrics.sparseness(None, x, a)


FAST = ("pixel_flipping,sparseness", 1, 2)  # (--metrics, --top-k, --steps): about 3 s
FULL = ("pixel_flipping,deletion_insertion,region_perturbation,sparseness", 2, 4)


@pytest.mark.parametrize("metric_names,k,steps", [FAST, pytest.param(*FULL, marks=pytest.mark.slow)],
                         ids=["fast", "full"])
def test_written_scores_equal_the_metrics_called_directly(setup, tmp_path, metric_names, k, steps):
    imgs, ckpt, state = setup
    p = runner()("evaluate", imgs, "--model", SMALL, "--checkpoint", ckpt, "--method", "gradcam", "--metrics",
                 metric_names, "--top-k", k, "--steps", steps, "--patch-size", "56", "--device", "cpu",
                 "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 1, p  # notes.png is no image: named, skipped, the other two scored
    assert re.fullmatch(r"funcam: error: .*notes\.png: .*", p.stderr.strip()), p
    res = json.loads((tmp_path / "o" / "scores.json").read_text())
    head = (tmp_path / "o" / "scores.csv").read_text().splitlines()[0]
    assert head == "image,rank,class,class_name,method," + ",".join(res["better"])
    assert res["images"] == 2 and res["unreadable"] == 1
    better = {"pixel_flipping": "lower", "deletion_auc": "lower", "insertion_auc": "higher",
              "region_perturbation": "higher", "sparseness": "higher"}
    assert res["better"] == {c: better[c] for c in res["better"]}

    torch.set_num_threads(1)
    model, pre = load_model(SMALL, checkpoint=state)
    x = preprocess([read_image(imgs / f"{n}.png") for n in ("a", "b")], pre)
    with torch.no_grad():
        idx = model(x).topk(k, dim=1).indices
    g = torch.Generator().manual_seed(0)
    sets = {"gradcam": explain(model, x, method="gradcam", classes=idx).maps,
            "baseline:random": metrics.random_maps(None, x, idx, generator=g),
            "baseline:centre": metrics.centre_maps(None, x, idx), "baseline:sobel": metrics.sobel_maps(None, x, idx)}
    for name, maps in sets.items():
        a = upsample(maps, x.shape[-2:])
        rows = [r for r in res["scores"] if r["method"] == name]
        assert len(rows) == 2 * k and [r["class"] for r in rows] == idx.flatten().tolist()
        for col in res["better"]:
            got = torch.tensor([r[col] for r in rows], dtype=torch.float64).view(2, k)
            assert not torch.isnan(got).any() and bool(got.ne(0).any()), (name, col)
            torch.testing.assert_close(got, reference(col, model, x, a, idx, steps).double(), rtol=1e-5, atol=1e-7)
            assert math.isclose(res["summary"][name][col], float(got.mean()), rel_tol=1e-9, abs_tol=1e-12)
    assert "gradcam" in p.stdout and "baseline:sobel" in p.stdout and "sparseness ↑" in p.stdout


BAD = [  # (arguments, the stderr line after "funcam: error: ", a regex)
    (["--metrics", "pixel_flipping,accuracy"], r"--metrics: unknown name 'accuracy'; expected a comma-separated list "
                                               r"of deletion_insertion, .*"),
    (["--baselines", "noise"], r"--baselines: unknown name 'noise'; .*, or none"),
    (["--steps", "0"], r"argument --steps: expected a positive integer, got '0'"),
    (["--method", "gradcamm"], r"--method: .*gradcamm.*"),
    (["--classes", "3,12"], r"--classes: class index 12 is out of range; the model has 10 classes \(0\.\.9\)"),
    (["--top-k", "11"], r"--top-k must be between 1 and 10 \(the number of classes\), got 11"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_options_are_one_error_line_and_nothing_written(setup, tmp_path, args, message):
    imgs, ckpt, _ = setup
    p = runner()("evaluate", imgs / "a.png", "--model", SMALL, "--checkpoint", ckpt, "--device", "cpu", "--out",
                 tmp_path / "o", *args, cwd=tmp_path)
    one_error(p, message)
    assert not (tmp_path / "o").exists()


def test_missing_input_is_refused_before_the_model(tmp_path):
    p = runner()("evaluate", tmp_path / "nope.png", "--model", SMALL, "--random-weights", "--out", tmp_path / "o",
                 cwd=tmp_path)
    one_error(p, r".*nope\.png: no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(runner()("evaluate", empty, "--out", tmp_path / "o", cwd=tmp_path),
              r"folder .*empty holds no image files")


def test_names_from_dedups_and_accepts_dashes_and_none():
    assert names_from("pixel-flipping, sparseness,pixel_flipping", ["pixel_flipping", "sparseness"], "--m") == [
        "pixel_flipping", "sparseness"]
    assert names_from("none", ["a"], "--b", none=True) == []
    with pytest.raises(UsageError, match="--m: unknown name 'none'"):
        names_from("none", ["a"], "--m")
