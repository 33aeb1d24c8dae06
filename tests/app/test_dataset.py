"""Dataset runs: sharded, resumable, torchrun-split maps equal direct ``funcam.gradcam`` calls image by image."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import funcam
from funcam._src.app.dataset import explain_dataset
from funcam._src.app.folder import list_images
from funcam._src.app.shards import DatasetError, load_maps
from funcam._src.cli.options import UsageError, parse_classes
from funcam.cli import main as funcam_main
from funcam.explain import explain
from funcam.images import read_image, sample_images
from funcam.models import load_model, preprocess
from tests._cli_runner import runner
from tests.conftest import FullDisk, record_vmap_chunks, timm_model

ARCH = "mobilenetv3_small_050"  # 224 px input but only ~25 MFLOPs: a 40-image run takes a few seconds
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _save_checkpoint(path, seed: int) -> str:
    torch.save(timm_model(ARCH, seed=seed).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """~40 images (34 generated in nested folders, the 6 bundled photos) and a 10-class checkpoint."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("ds")
    img = d / "images"
    (img / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(34):
        h, w = 40 + 3 * i, 90 - i
        # smooth blobs rather than noise, so JPEG artefacts stay small and the maps vary spatially
        yy, xx = np.mgrid[:h, :w]
        a = np.stack([np.sin(xx / (4 + i % 5 + c) + yy / (7 + c)) for c in range(3)], -1)
        arr = ((a + 1) * 127 + rng.integers(0, 20, a.shape)).clip(0, 255).astype(np.uint8)
        folder = img if i % 3 == 0 else img / "sub" if i % 3 == 1 else img / "sub" / "deeper"
        Image.fromarray(arr).save(folder / f"gen{i:02d}.{'png' if i % 2 else 'jpg'}")
    for name, t in sample_images().items():
        Image.fromarray(t.permute(1, 2, 0).numpy()).save(img / f"{name}.jpg", quality=90)
    (img / "notes.txt").write_text("not an image suffix: never listed")
    ckpt = _save_checkpoint(d / "ckpt.pt", 0)
    return {"dir": d, "images": str(img), "ckpt": ckpt}


def _model(ckpt):
    return load_model(ARCH, checkpoint=ckpt, num_classes=10)


def _run(data, out, **kw):
    model, cfg = _model(kw.pop("ckpt", data["ckpt"]))
    images = kw.pop("images", data["images"])
    opts = dict(method="gradcam", top_k=3, shard_size=8, batch_size=4, progress=False, model_name=ARCH)
    opts.update(kw)
    return explain_dataset(images, str(out), model, cfg, **opts)


def _jsonl(path) -> list:
    return [json.loads(line) for line in open_text(path).splitlines()]


def open_text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _per_image(out, **kw) -> dict:
    """path -> (maps (K, h, w) float16, classes (K,), logits (N,)) from every finished shard."""
    res = {}
    for chunk in load_maps(str(out), **kw):
        for p, m, c, lg in zip(chunk.paths, chunk.maps, chunk.classes, chunk.logits):
            assert p not in res, f"{p} stored twice"
            res[p] = (m, c, lg)
    return res


def cli_main(args: list) -> int:
    """``funcam explain-dir ARGS`` in this process."""
    return funcam_main(["explain-dir", *args])


def _cli(data, out, *extra, images=None):
    return [str(images or data["images"]), "--out", str(out), "--model", ARCH, "--checkpoint", data["ckpt"], "--method",
            "gradcam", "--top-k", "3", "--batch-size", "4", "--quiet", *extra]


@pytest.fixture(scope="module")
def single(data):
    """An uninterrupted single-process run with 2 DataLoader workers (the reference for the other runs)."""
    out = data["dir"] / "single"
    summary = _run(data, out, num_workers=2)
    return out, summary, _per_image(out)


def test_single_run_matches_direct_gradcam(data, single):
    out, summary, got = single
    paths = list_images(data["images"])
    assert len(paths) == 40 and "notes.txt" not in paths
    assert summary.images == 40 and summary.errors == 0 and summary.written == 5 and summary.skipped == 0
    assert sorted(got) == paths  # none missing, none twice (checked in _per_image)
    lines = _jsonl(out / "manifest.jsonl")
    assert lines[0]["settings"]["method"] == "gradcam" and [r["path"] for r in lines[1:]] == paths
    assert (out / "errors.jsonl").read_text() == ""
    model, cfg = _model(data["ckpt"])
    x = preprocess([read_image(os.path.join(data["images"], p)) for p in paths], cfg)
    ref = explain(model, x, method="gradcam", top_k=3)
    # the peer entry point too: funcam.gradcam on the model's split with the stored classes, in the run's
    # batches of 4 (bit-exact; other batch sizes may round differently in the convolutions)
    direct = torch.cat([funcam.gradcam(funcam.split(model), x[i:i + 4], ref.classes[i:i + 4])
                        for i in range(0, len(paths), 4)]).detach()
    for i, p in enumerate(paths):
        maps, cls, logits = got[p]
        assert torch.equal(cls, ref.classes[i])
        torch.testing.assert_close(logits, ref.logits[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.float(), ref.maps[i].detach(), rtol=2e-3, atol=1e-7)  # float16 storage
        assert maps.dtype == torch.float16 and maps.shape == (3, 7, 7) and maps.float().abs().sum() > 0
        assert torch.equal(maps, direct[i].half())


@pytest.mark.slow  # two torchrun processes: about 15 s
def test_torchrun_two_processes_equal_single(data, single):
    out = data["dir"] / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "funcam.cli", "explain-dir", *_cli(data, out, "--shard-size", "8", "--workers", "0")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _per_image(out)
    ref = single[2]
    assert sorted(got) == sorted(ref)
    for p in ref:
        assert all(torch.equal(a, b) for a, b in zip(got[p], ref[p])), p
    ranks = {}
    for chunk_file in sorted(os.listdir(out / "shards")):
        from funcam._src.app.shards import read_meta

        ranks[chunk_file] = read_meta(str(out / "shards" / chunk_file))["rank"]
    assert sorted(set(ranks.values())) == [0, 1]  # both ranks wrote shards: 0, 2, 4 and 1, 3
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["world_size"] == 2


@pytest.mark.slow  # a killed subprocess run resumed: about 25 s
def test_killed_run_resumes_to_identical_result(data, single):
    out = data["dir"] / "killed"
    cmd = [sys.executable, "-m", "funcam.cli", "explain-dir", *_cli(data, out, "--shard-size", "2", "--workers", "0")]
    cmd[cmd.index("--batch-size") + 1] = "1"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = out / "shards"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and any(n.endswith(".safetensors") for n in os.listdir(shards)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = sorted(n for n in os.listdir(shards) if n.endswith(".safetensors"))
    assert 1 <= len(done) < 20, f"the kill came too late to test resuming ({len(done)} of 20 shards)"
    assert not (out / "manifest.jsonl").exists()
    # a partial shard under a temporary name, as a kill during a write leaves it: never read
    first = (shards / done[0]).read_bytes()
    (shards / "shard-000019.safetensors.tmp-99999").write_bytes(first[: len(first) // 2])
    partial = _per_image(out)
    assert 1 <= len(partial) <= 2 * len(done)
    # restart in-process with the same arguments (workers may differ: they only decode)
    model, cfg = _model(data["ckpt"])
    summary = explain_dataset(data["images"], str(out), model, cfg, method="gradcam", top_k=3, shard_size=2,
                              batch_size=1, num_workers=2, progress=False, model_name=ARCH)
    assert summary.skipped >= len(done) and summary.written + summary.skipped == 20
    assert not any(".tmp-" in n for n in os.listdir(shards))
    # the uninterrupted run with the same arguments; batches follow shards, so the batches are the same too
    _run(data, data["dir"] / "uninterrupted", shard_size=2, batch_size=1)
    got, ref = _per_image(out), _per_image(data["dir"] / "uninterrupted")
    assert sorted(got) == sorted(single[2])
    for p in ref:
        assert all(torch.equal(a, b) for a, b in zip(got[p], ref[p])), p
        torch.testing.assert_close(got[p][0].float(), single[2][p][0].float(), rtol=2e-3, atol=1e-7)
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["shards_done_before"] >= len(done)


def test_bad_files_are_listed_and_skipped(data, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    good = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    good.save(img / "a_good.jpg", quality=95)
    full = (img / "a_good.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (img / "text.png").write_text("this is not a PNG")
    (img / "empty.png").write_bytes(b"")
    deep = (np.arange(50 * 70, dtype=np.uint32).reshape(50, 70) * 18).astype(np.uint16)
    Image.fromarray(deep).save(img / "deep16.png")
    with Image.open(img / "deep16.png") as im:
        assert im.mode.startswith("I")
    good.save(img / "z_good.png")
    out = tmp_path / "out"
    summary = _run(data, out, images=str(img), shard_size=2, batch_size=2, num_workers=2)
    assert summary.images == 6 and summary.errors == 3
    errors = {e["path"]: e["error"] for e in _jsonl(out / "errors.jsonl")}
    assert sorted(errors) == ["empty.png", "text.png", "truncated.jpg"]
    assert "empty" in errors["empty.png"]
    assert "not an image" in errors["text.png"]
    assert "truncated" in errors["truncated.jpg"]
    got = _per_image(out)
    assert sorted(got) == ["a_good.jpg", "deep16.png", "z_good.png"]
    assert all(m.float().abs().sum() > 0 for m, _, _ in got.values())
    lines = _jsonl(out / "manifest.jsonl")[1:]
    assert sorted(r["path"] for r in lines) == sorted(list(got) + list(errors))
    with pytest.raises(KeyError, match="text.png.*unreadable: not an image"):
        load_maps(str(out), paths=["text.png"])


def test_changed_model_or_method_is_refused(data, tmp_path, capsys):
    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(img / "one.png")
    out = tmp_path / "out"
    assert cli_main(_cli(data, out, images=img)) == 0
    other = _save_checkpoint(tmp_path / "other.pt", 1)
    args = _cli(data, out, images=img)
    args[args.index("--checkpoint") + 1] = other
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "weights_sha256" in err and "new --out" in err
    args = _cli(data, out, images=img)
    args[args.index("--method") + 1] = "gradcampp"
    assert cli_main(args) == 2
    assert "method: \"gradcam\" before, \"gradcampp\" now" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="top_k: 3 before, 1 now"):
        _run(data, out, images=str(img), top_k=None)
    assert cli_main(_cli(data, out, images=img)) == 0  # the same settings again: fine (all skipped)


def test_load_maps_classes_and_npz(data, tmp_path, single):
    sub = [p for p in list_images(data["images"]) if p.startswith("sub/deeper/")]
    assert len(sub) == 11
    out = tmp_path / "npz"
    list_file = tmp_path / "list.txt"
    list_file.write_text("# images of one folder\n" + "\n".join(reversed(sub)) + "\n")
    assert cli_main(_cli(data, out, "--format", "npz", "--list", str(list_file), "--shard-size", "4",
                         "--workers", "0")) == 0
    assert sorted(os.listdir(out / "shards")) == [f"shard-00000{i}.npz" for i in range(3)]
    got = _per_image(out)
    ref = single[2]
    assert sorted(got) == sub
    for p in sub:
        assert all(torch.equal(a, b) for a, b in zip(got[p], ref[p]))
    # class columns: the stored map where the class was among the image's top 3, NaN elsewhere
    picked = _per_image(out, paths=sub[:2], classes=[4, 0])
    assert sorted(picked) == sub[:2]
    for p, (maps, cls, _) in picked.items():
        assert cls.tolist() == [4, 0]
        for j, c in enumerate((4, 0)):
            hit = (ref[p][1] == c).nonzero()
            if len(hit):
                assert torch.equal(maps[j], ref[p][0][hit[0, 0]])
            else:
                assert maps[j].isnan().all()
    with pytest.raises(KeyError, match="nope.png.*not in the finished shards"):
        load_maps(str(out), paths=["nope.png"])


def test_all_classes_overlays_and_argument_errors(data, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(img / "r.png")
    out = tmp_path / "out"
    _run(data, out, images=str(img), top_k=None, classes="all", overlays=True, method="gradcampp")
    (maps, cls, logits), = _per_image(out).values()
    model, cfg = _model(data["ckpt"])
    x = preprocess([read_image(img / "r.png")], cfg)
    assert cls.tolist() == list(range(10)) and torch.equal(maps, funcam.gradcampp(model, x, list(range(10)))[0].half())
    # overlays for the 5 highest-scoring of the 10 classes, named like the input
    top5 = logits.topk(5).indices.tolist()
    assert sorted(os.listdir(out / "overlays")) == sorted(f"r.png__{c}__gradcampp.png" for c in top5)
    assert parse_classes("3, 7,10-12") == [3, 7, 10, 11, 12]
    with pytest.raises(UsageError, match="ranges like"):
        parse_classes("3,x")
    for kw, msg in [(dict(format="hdf5"), "format must be one of"), (dict(batch_size=0), "batch_size must be"),
                    (dict(shard_size=1.5), "shard_size must be"), (dict(classes=[1]), "either classes= or top_k=")]:
        with pytest.raises(ValueError, match=msg):
            _run(data, tmp_path / "bad", images=str(img), **kw)
    with pytest.raises(DatasetError, match="not a directory"):
        _run(data, tmp_path / "bad", images=str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no settings.json"):
        load_maps(str(tmp_path))



# ------------------------------------------------------------------ issue 16: the command line's edges

def _small_folder(root, names=("a.png", "b.png"), seed=0):
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        arr = np.random.default_rng(seed + i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / n)
    return root


def _args(data, img, out, *extra):
    return ["explain-dir", img, "--out", out, "--model", ARCH, "--checkpoint", data["ckpt"], "--workers", "0",
            "--batch-size", "4", *extra]


def _only_error(p, line: str) -> None:
    assert (p.returncode, p.stdout, p.stderr) == (2, "", f"funcam: error: {line}\n"), p


def test_typos_are_refused_before_anything_is_written(data, tmp_path):
    # issue 16: --classes 5000, --layer nope or an unfit method wrote settings.json first, so the corrected
    # command was refused as "different settings"; --device cuda without CUDA was a traceback
    cli = runner()
    img = _small_folder(tmp_path / "img")
    out = tmp_path / "out"
    cases = [(["--classes", "5000"], "--classes: class index 5000 is out of range; the model has 10 classes (0..9)"),
             (["--classes", "-1"], "--classes: class index -1 is out of range; the model has 10 classes (0..9)"),
             (["--top-k", "11"], "--top-k must be between 1 and 10 (the number of classes), got 11"),
             (["--layer", "nope"], "--layer: split: unknown layer 'nope'; nearest valid names: ['bn1.drop']"),
             (["--method", "chefer"], "--method chefer: MobileNetV3 has no self-attention over its patch tokens "
                                      "that funcam can find (F.scaled_dot_product_attention, nn.MultiheadAttention "
                                      "or a softmax over tokens): attention rollout and relevance need one; use "
                                      "funcam.gradcam"),
             (["--num-classes", "0"], "argument --num-classes: expected a positive integer, got '0'"),
             (["--max-memory", "2GB"], "argument --max-memory: expected a positive size such as 512M or 2G, got '2GB'"),
             # the class list of `funcam explain`, with its messages (was "argument --classes: must be ...")
             (["--classes", "3,x"], "--classes must be comma-separated class indices like 281,285 or ranges like "
                                    "10-12; got '3,x'"),
             (["--classes", "12-10"], "--classes: the range 12-10 is empty (write it low-high, e.g. 10-12)")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine "
                                            "(torch.cuda.is_available() is False); use --device cpu"))
    for extra, line in cases:
        _only_error(cli(*_args(data, img, out, *extra), cwd=tmp_path), line)
        assert not out.exists(), extra
    p = cli("explain-dir", img, "--out", out, "--model", ARCH, cwd=tmp_path)
    _only_error(p, f"--model {ARCH} needs weights: add --pretrained (timm's weights, downloaded once), --checkpoint "
                   f"FILE (your own), or --random-weights (an untrained network: its maps mean nothing)")
    p = cli(*_args(data, img, out, "--classes", "5", "--quiet"), cwd=tmp_path)  # the corrected command
    assert (p.returncode, p.stderr) == (0, ""), p


def test_exit_codes_and_per_file_errors_as_they_happen(data, tmp_path):
    # issue 16: exit 0 when some or all images were unreadable; README promises 1 and 2
    cli = runner()
    img = _small_folder(tmp_path / "img", ("a.png", "c.png"))
    (img / "b.png").write_text("not a png")
    out = tmp_path / "out"
    p = cli(*_args(data, img, out, "--shard-size", "1", "--batch-size", "1"), cwd=tmp_path)
    assert p.returncode == 1, p
    lines = p.stderr.splitlines()
    # the error when b.png is met (shard 1 of 3), before the summary of the run
    assert lines[0] == "funcam: error: b.png: not an image file (unrecognised format)"
    assert re.fullmatch(r"3 images, 1 unreadable \(see .*errors\.jsonl\); 3 shards written, 0 already done; "
                        r"[\d.]+ s", lines[1]) and len(lines) == 2, p
    assert _jsonl(out / "errors.jsonl") == [{"path": "b.png", "error": "not an image file (unrecognised format)"}]
    p = cli(*_args(data, img, out, "--shard-size", "1", "--batch-size", "1", "--quiet"), cwd=tmp_path)
    assert (p.returncode, p.stderr) == (1, ""), p  # resumed: still 1, the error was recorded
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    (bad / "y.jpg").write_text("text")
    p = cli(*_args(data, bad, tmp_path / "out2", "--quiet"), cwd=tmp_path)
    assert (p.returncode, p.stdout) == (2, ""), p
    assert p.stderr.splitlines() == [
        "funcam: error: x.png: empty file", "funcam: error: y.jpg: not an image file (unrecognised format)",
        f"funcam: error: none of the 2 images could be read (each is named above and in "
        f"{tmp_path / 'out2' / 'errors.jsonl'})"]


def test_non_utf8_file_name_does_not_abort_the_run(data, tmp_path):
    # issue 16: one name that is not valid UTF-8 aborted the run (the run's hash encoded the joined paths)
    cli = runner()
    img = _small_folder(tmp_path / "img", ("a.png",))
    raw = os.path.join(os.fsencode(img), b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write((img / "a.png").read_bytes())
    (img / "caf\u00e9.png").write_bytes(b"")  # its valid UTF-8 spelling, a different (empty) file
    out = tmp_path / "out"
    p = cli(*_args(data, img, out, "--overlays", "--top-k", "1", "--quiet"), cwd=tmp_path)
    assert p.returncode == 1, p
    assert p.stderr == "funcam: error: caf\u00e9.png: empty file\n"
    name = os.fsdecode(b"caf\xe9.png")  # 'caf\udce9.png'
    got = _per_image(out)
    assert sorted(got) == ["a.png", name] and torch.equal(got["a.png"][0], got[name][0])  # the same pixels
    assert [m.paths for m in load_maps(str(out), paths=[name])] == [(name,)]
    c = int(got[name][1][0])
    name = f"caf\xe9.png__{c}__gradcam.png".encode("latin-1")
    assert os.path.isfile(os.path.join(os.fsencode(out), b"overlays", name))
    assert json.loads((out / "settings.json").read_text())["images"]["count"] == 3


def test_overlays_are_unique_labelled_and_named_like_their_inputs(data, tmp_path):
    # issue 16: x.png next to a folder x.png.png/ failed with "File exists" on every resume; overlays were
    # unlabelled and named x.png.png
    from funcam.render import grid, overlay, to_uint8

    cli = runner()
    img = _small_folder(tmp_path / "img", ("x.png", "x.jpg", "x.png.png/y.png", "50%/z.png"))
    out = tmp_path / "out"
    for _ in range(2):  # the second run resumes: nothing to do, nothing in the way
        p = cli(*_args(data, img, out, "--overlays", "--top-k", "2", "--quiet"), cwd=tmp_path)
        assert (p.returncode, p.stderr) == (0, ""), p
    got = _per_image(out)
    where = {"x.png": "x.png", "x.jpg": "x.jpg", "x.png.png/y.png": "x.png.pn%67/y.png", "50%/z.png": "50%25/z.png"}
    want = {f"{where[path]}__{int(c)}__gradcam.png" for path, (_, cls, _) in got.items() for c in cls}
    files = {str(q.relative_to(out / "overlays")) for q in (out / "overlays").rglob("*") if q.is_file()}
    assert sorted(got) == sorted(where) and files == want and len(files) == 8
    # each overlay is the crop and its map over it, labelled, with the colour scale: rebuilt from the shards
    model, cfg = _model(data["ckpt"])
    x = preprocess([read_image(img / "x.jpg")], cfg)
    maps, cls, logits = got["x.jpg"]
    crop = to_uint8(x, mean=cfg.mean, std=cfg.std)
    probs = logits.softmax(-1)[cls]
    for k in range(2):
        tiles = torch.stack([crop[0], overlay(crop, maps[None, k:k + 1].float())[0, 0]])[None]
        ref = grid(tiles, row_labels=["Grad-CAM"], col_labels=["input", f"class {int(cls[k])} {float(probs[k]):.2f}"],
                   legend="jet")
        with Image.open(out / "overlays" / f"x.jpg__{int(cls[k])}__gradcam.png") as png:
            assert torch.equal(torch.from_numpy(np.array(png)).permute(2, 0, 1), ref)
    # every output file has the same mode (safetensors would create shards 0600)
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(q.relative_to(out)): q.stat().st_mode & 0o777 for q in out.rglob("*") if q.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_overlay_names_are_injective():
    from funcam._src.app.overlay import overlay_name

    paths = ["x.png", "x.png.png/y.png", "x.pn%67/y.png", "%2E%2E/x.png", "../x.png", "/abs/x.png", "%2F/abs/x.png",
             "a/x.png", "a%2Fx.png", "X.PNG/y.png", "x.png__1__gradcam.png", "n" * 250 + "1.png", "n" * 250 + "2.png",
             "//abs/x.png", "%00/abs/x.png"]
    names = [overlay_name(p, 1, "gradcam") for p in paths]
    assert len(set(names)) == len(names), names
    assert names[:5] == ["x.png__1__gradcam.png", "x.png.pn%67/y.png__1__gradcam.png",
                         "x.pn%2567/y.png__1__gradcam.png", "%252E%252E/x.png__1__gradcam.png",
                         "%2E%2E/x.png__1__gradcam.png"]
    assert names[5] == "%2F/abs/x.png__1__gradcam.png" and names[9] == "X.PN%47/y.png__1__gradcam.png"
    folders = {n.rsplit("/", 1)[0] for n in names if "/" in n}
    assert not any(f.lower().endswith(".png") for n in names for f in n.split("/")[:-1])  # no folder looks like
    assert all(len(os.fsencode(n.rsplit("/", 1)[-1])) <= 255 for n in names) and folders  # an overlay file


def test_listed_paths_are_normalised_and_never_collide(data, tmp_path):
    # issue 16: x.png, ./x.png and ../x.png in --list wrote one overlay file, and x.png was explained twice
    cli = runner()
    root = _small_folder(tmp_path / "root", ("x.png",))
    _small_folder(tmp_path, ("other.png",), seed=5)
    os.replace(tmp_path / "other.png", tmp_path / "x.png")  # ../x.png: another picture, same name
    (tmp_path / "list.txt").write_text("x.png\n./x.png\n../x.png\nsub/../x.png\n")
    out = tmp_path / "out"
    p = cli(*_args(data, root, out, "--list", tmp_path / "list.txt", "--overlays", "--top-k", "1", "--quiet"),
            cwd=tmp_path)
    assert (p.returncode, p.stderr) == (0, ""), p
    got = _per_image(out)
    assert sorted(got) == ["../x.png", "x.png"] and not torch.equal(got["x.png"][2], got["../x.png"][2])
    names = sorted(str(q.relative_to(out / "overlays")) for q in (out / "overlays").rglob("*.png"))
    assert names == [f"%2E%2E/x.png__{int(got['../x.png'][1][0])}__gradcam.png",
                     f"x.png__{int(got['x.png'][1][0])}__gradcam.png"]


def test_a_second_run_on_the_same_out_is_refused_and_harms_nothing(data, tmp_path):
    # issue 16: a second run deleted the first one's in-flight temporary file (the first then died), and two
    # runs doubled all the work. The holder here is a process that took the lock as a run does.
    import fcntl

    cli = runner()
    img = _small_folder(tmp_path / "img")
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, f'{os.getpid()} otherhost\\n'.encode(), 0)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        inflight = out / "shards" / f"shard-000000.safetensors.tmp-{holder.pid}"
        inflight.write_bytes(b"half a shard")
        p = cli(*_args(data, img, out, "--quiet"), cwd=tmp_path)
        _only_error(p, f"{out} is in use by process {holder.pid} on otherhost (another explain-dir run writes "
                       f"there); wait for it to finish, or use another --out")
        assert inflight.read_bytes() == b"half a shard" and not (out / "settings.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    # the holder is gone, its PID still in the lock file: the lock is free (the kernel dropped it), taken over
    assert (out / ".lock").read_text() == f"{holder.pid} otherhost\n"
    p = cli(*_args(data, img, out, "--quiet"), cwd=tmp_path)
    assert (p.returncode, p.stderr) == (0, ""), p
    assert not inflight.exists()  # a dead run's temporary file is cleaned up by the next one
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the run ended
    finally:
        os.close(fd)


def test_disk_full_is_one_line_and_leaves_no_temporary(data, tmp_path):
    # issue 16: a full disk gave a SafetensorError traceback (exit 1)
    cli = runner()
    img = _small_folder(tmp_path / "img", ("a.png", "b.png", "c.png", "d.png"))
    out = tmp_path / "out"
    p = cli(*_args(data, img, out, "--all-classes", "--quiet"), cwd=tmp_path, fsize=2500)
    _only_error(p, f"cannot write {out / 'shards' / 'shard-000000.safetensors'}: File too large")
    assert [q.name for q in out.rglob("*") if ".tmp-" in q.name] == []
    p = cli(*_args(data, img, out, "--all-classes", "--quiet"), cwd=tmp_path)  # space again: it resumes
    assert (p.returncode, p.stderr) == (0, ""), p
    assert sorted(_per_image(out)) == ["a.png", "b.png", "c.png", "d.png"]


def test_listed_paths_that_leave_the_root_and_come_back_are_one_file(tmp_path):
    from funcam._src.app.folder import normalise_paths

    root = tmp_path / "d"
    root.mkdir()
    got = normalise_paths(["x.png", "./x.png", "../d/x.png", "sub/../x.png", "../other.png"], root)
    assert got == ["../other.png", "x.png"]


def test_a_failed_log_append_leaves_no_empty_log_and_names_the_file(tmp_path, monkeypatch):
    from funcam._src.app import files

    real = open  # a partial line lands before the disk is full: it must be taken back
    monkeypatch.setattr(files, "open", lambda p, *a, **k: FullDisk(real(p, *a, **k)), raising=False)
    log = tmp_path / "runs.jsonl"
    with pytest.raises(OSError, match="No space left") as e:
        files.append_text(log, '{"run": 1, "padding": "longer than ten bytes"}\n')
    assert e.value.filename == str(log) and not log.exists()
    log.write_text("old\n")
    with pytest.raises(OSError):
        files.append_text(log, '{"run": 2, "padding": "longer than ten bytes"}\n')
    assert log.read_text() == "old\n"


# ------------------------------------------------------------------ memory: max_memory, not a fixed chunk of 64

@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Two small images and a 70-class checkpoint: K = 70 is above the 64 that explain_dataset used to force."""
    d = tmp_path_factory.mktemp("many")
    state = timm_model(ARCH, num_classes=70, seed=3).state_dict()
    # random weights give maps of about 1e-4, mostly below float16's normal range (6e-5), where the stored maps
    # keep only absolute precision; a 1000x classifier scales Grad-CAM's and LayerCAM's maps by 1000
    state["classifier.weight"] *= 1000
    torch.save(state, d / "ckpt70.pt")
    return {"images": _small_folder(d / "img"), "ckpt": str(d / "ckpt70.pt")}


def _direct(many, method: str):
    """explain on the two images as one batch (the run's batch), all 70 classes."""
    model, cfg = load_model(ARCH, checkpoint=many["ckpt"], num_classes=70)
    x = preprocess([read_image(many["images"] / n) for n in ("a.png", "b.png")], cfg)
    return explain(model, x, method=method, classes=list(range(70)))


def _same_maps(out, ref) -> None:
    got = _per_image(out)
    assert sorted(got) == ["a.png", "b.png"]
    assert bool((ref.maps != 0).any())
    for i, p in enumerate(("a.png", "b.png")):
        maps, cls, _ = got[p]
        assert cls.tolist() == list(range(70)) and maps.shape == ref.maps[i].shape
        # float16 storage (one unit in the last place, 2**-24 below its normal range), and float rounding between
        # chunkings (tests/test_state.py)
        torch.testing.assert_close(maps.float(), ref.maps[i].half().float(), rtol=1e-3,
                                   atol=2**-24 + 1e-5 * float(ref.maps.abs().max()))


def test_many_classes_follow_max_memory_not_a_chunk_of_64(many, tmp_path, monkeypatch, one_thread):
    # explain_dataset forced chunk_size=64 above 64 classes (from before max_memory): [1, 64, 64] here, the
    # memory bound overridden
    ref = _direct(many, "gradcam")
    model, cfg = load_model(ARCH, checkpoint=many["ckpt"], num_classes=70)
    opts = dict(method="gradcam", classes="all", batch_size=4, progress=False)
    out = tmp_path / "out"
    with record_vmap_chunks(monkeypatch) as seen:
        summary = explain_dataset(str(many["images"]), str(out), model, cfg, **opts)
    assert summary.images == 2 and summary.errors == 0
    # the blank-image check (top-1), then the one batch on mobilenetv3's pooled head (one vmap per chunk): all
    # 70 classes in one chunk under the default budget
    assert seen == [1, 70], seen
    _same_maps(out, ref)
    # max_memory only bounds memory: it is not a setting, so it neither changes the maps nor blocks a restart
    out1 = tmp_path / "out1"
    with record_vmap_chunks(monkeypatch) as seen:
        explain_dataset(str(many["images"]), str(out1), model, cfg, max_memory=1, **opts)
    assert seen == [1] + [1] * 70, seen  # one class per chunk
    _same_maps(out1, ref)
    assert json.loads((out / "settings.json").read_text()) == json.loads((out1 / "settings.json").read_text())
    summary = explain_dataset(str(many["images"]), str(out), model, cfg, max_memory=1, chunk_size=7, **opts)
    assert (summary.written, summary.skipped) == (0, 1)


@pytest.mark.parametrize("kw,msg", [(dict(max_memory=0), "max_memory must be None or a positive number of bytes, "
                                     "got 0"), (dict(max_memory="1G"), "max_memory must be .* got '1G'"),
                                    (dict(chunk_size=0), "chunk_size must be None or a positive int, got 0")])
def test_bad_memory_options_are_refused_before_anything_is_written(data, tmp_path, kw, msg):
    img = _small_folder(tmp_path / "img", ("a.png",))
    with pytest.raises(ValueError, match=msg):
        _run(data, tmp_path / "out", images=str(img), **kw)
    assert not (tmp_path / "out").exists()


def test_cli_max_memory_reaches_the_run(many, tmp_path, monkeypatch):
    ref = _direct(many, "gradcam")
    out = tmp_path / "out"
    with record_vmap_chunks(monkeypatch) as seen:
        assert cli_main([str(many["images"]), "--out", str(out), "--model", ARCH, "--checkpoint", many["ckpt"],
                         "--all-classes", "--workers", "0", "--max-memory", "1", "--quiet"]) == 0
    # one blank-image check for the whole run (it was two: the CLI's and explain_dataset's), then chunks of one
    assert seen[-70:] == [1] * 70 and len(seen) == 70 + 1, seen
    _same_maps(out, ref)
