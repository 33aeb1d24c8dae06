"""Dataset runs: sharded, resumable, torchrun-split maps equal direct ``funcam.gradcam`` calls image by image."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import funcam
from funcam._cli_dataset import main as cli_main, parse_class_list
from funcam.cli import main as funcam_main
from funcam.dataset import DatasetError, explain_dataset, list_images, load_maps
from funcam.explain import explain
from funcam.images import read_image, sample_images
from funcam.models import load_model, preprocess

ARCH = "mobilenetv3_small_050"  # 224 px input but only ~25 MFLOPs: a 40-image run takes a few seconds
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _save_checkpoint(path, seed: int) -> str:
    torch.manual_seed(seed)
    torch.save(timm.create_model(ARCH, pretrained=False, num_classes=10).state_dict(), path)
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
        from funcam._shards import read_meta

        ranks[chunk_file] = read_meta(str(out / "shards" / chunk_file))["rank"]
    assert sorted(set(ranks.values())) == [0, 1]  # both ranks wrote shards: 0, 2, 4 and 1, 3
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["world_size"] == 2


def test_killed_run_resumes_to_identical_result(data, single):
    out = data["dir"] / "killed"
    cmd = [sys.executable, "-m", "funcam._cli_dataset", *_cli(data, out, "--shard-size", "2", "--workers", "0")]
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
    assert funcam_main(["explain-dir", *args]) == 2  # the same through the funcam command
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
    with Image.open(out / "overlays" / "r.png.png") as png:
        assert png.size == (5 * cfg.size, cfg.size)
    assert parse_class_list("3, 7,10-12") == [3, 7, 10, 11, 12]
    with pytest.raises(Exception, match="ranges like"):
        parse_class_list("3,x")
    for kw, msg in [(dict(format="hdf5"), "format must be one of"), (dict(batch_size=0), "batch_size must be"),
                    (dict(shard_size=1.5), "shard_size must be"), (dict(classes=[1]), "either classes= or top_k=")]:
        with pytest.raises(ValueError, match=msg):
            _run(data, tmp_path / "bad", images=str(img), **kw)
    with pytest.raises(DatasetError, match="not a directory"):
        _run(data, tmp_path / "bad", images=str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no settings.json"):
        load_maps(str(tmp_path))
