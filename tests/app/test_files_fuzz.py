"""Hostile and unusual image files through ``read_image``, ``funcam explain`` and ``funcam explain-dir``.

The contract (README, "Guarantees"): every file is either decoded to a correct upright RGB image or refused
with one line ``FILE: reason``; a refusal never stops the others; no traceback reaches stderr; a refused bomb
costs no decoding; nothing changes Pillow's or the warnings module's global state.

The corpus is generated in ``tmp_path``: a PNG and a JPEG cut at many points and with seeded random byte
flips, random bytes, headers claiming huge sizes (PNG, JPEG, GIF, BMP), decompression bombs (a few hundred kB
that decode to over 100 megapixels, compressed-text bombs), formats outside the decoded set, a pipe, a folder
and non-UTF-8 or newline file names; and valid but unusual files (16-bit, CMYK, palette with transparency,
LA, 1-bit, animated GIF and PNG, all 8 EXIF orientations, 1x1, 1x5000 and 5000x1), checked against oracles.
"""
from __future__ import annotations

import functools
import io
import json
import os
import random
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from funcam.images import MAX_ASPECT, MAX_PIXELS, ImageError, limit_aspect, read_image

ARCH = "mobilenetv3_small_050"  # 224 px input, ~25 MFLOPs: fast enough for in-process command-line runs


# ----------------------------------------------------------------------------------------------- generators
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int, *, depth: int = 8, color: int = 0, rows: bytes | None = None, idat: bytes | None = None,
         before_idat: bytes = b"") -> bytes:
    """A PNG written by hand: ``idat`` as given, or zlib of ``rows`` (default all-zero rows, streamed row by
    row, so a 144-megapixel bomb is built in a few hundred ms and weighs ~150 kB)."""
    if idat is None:
        comp = zlib.compressobj(9)
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
        row = b"\x00" + bytes((w * depth * channels + 7) // 8)
        parts = [comp.compress(row) for _ in range(h)] if rows is None else [comp.compress(rows)]
        idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + before_idat + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _encoded(fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :64]
    arr = np.stack([np.sin(xx / 5 + c) * 100 + 120 + rng.integers(0, 20, (48, 64)) for c in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A valid small JPEG whose SOF0 header is patched to claim ``w x h``."""
    b = bytearray(_encoded("JPEG"))
    sof = b.index(b"\xff\xc0")
    b[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def _gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF with a logical screen and one frame of the given sizes and a few bytes of LZW data."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    desc = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return head + desc + b"\x02\x02\x44\x01\x00;"


def _bmp(w: int, h: int) -> bytes:
    """A 24-bit BMP header claiming ``w x h`` followed by 100 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 100, 0, 0, 54) + info + bytes(100)


@functools.lru_cache(maxsize=None)
def corpus() -> dict[str, bytes]:
    """Files that must be refused (except a byte flip that leaves a decodable image)."""
    files: dict[str, bytes] = {}
    rnd = random.Random(0)
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        good = _encoded(fmt)
        for frac in (0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            files[f"cut{int(frac * 100):02d}.{ext}"] = good[: max(1, int(len(good) * frac))]
        for i in range(12):
            b = bytearray(good)
            for _ in range(1 + i):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            files[f"flip{i:02d}.{ext}"] = bytes(b)
        files[f"random.{ext}"] = rnd.randbytes(3000)
        files[f"header_only.{ext}"] = good[:40]
    files["huge_header.png"] = _png(100_000, 100_000, idat=zlib.compress(b"\x00" * 1000))
    files["huge_header.jpg"] = _jpeg_claiming(60_000, 60_000)
    files["huge_screen.gif"] = _gif((65_535, 65_535), (1, 1))
    files["huge_frame.gif"] = _gif((1, 1), (20_000, 20_000))  # the frame grows the image while Pillow parses
    files["huge_header.bmp"] = _bmp(100_000, 100_000)
    files["bomb_gray.png"] = _png(12_000, 12_000)  # 144 Mpx of zeros, ~140 kB: Pillow's own warning range
    files["bomb_1bit.png"] = _png(40_000, 40_000, depth=1)  # 1.6 Gpx: Pillow's own error range
    files["over_limit.png"] = _png(8_000, 8_000)  # 64 Mpx: above funcam's 50 Mpx, below Pillow's limits
    text_bomb = b"Comment\x00\x00" + zlib.compress(b"a" * 20_000_000, 9)  # 20 MB of text in ~20 kB
    files["ztxt_bomb.png"] = _png(4, 4, before_idat=_chunk(b"zTXt", text_bomb))
    files["eps.png"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Ghostscript bait
    files["text.png"] = b"this is not an image\n"
    files["empty.jpg"] = b""
    return files


REASONS = {  # file -> words its refusal must contain
    "huge_header.png": "100000x100000 = 10000000000 pixels exceeds max_pixels=50000000",
    "huge_header.jpg": "60000x60000 = 3600000000 pixels exceeds max_pixels",
    "huge_screen.gif": "65535x65535 = 4294836225 pixels exceeds max_pixels",
    "huge_frame.gif": "decompression bomb",
    "huge_header.bmp": "exceeds max_pixels",
    "bomb_gray.png": "12000x12000 = 144000000 pixels exceeds max_pixels=50000000 (a possible decompression bomb)",
    "bomb_1bit.png": "40000x40000 = 1600000000 pixels exceeds max_pixels",
    "over_limit.png": "8000x8000 = 64000000 pixels exceeds max_pixels",
    "ztxt_bomb.png": "too large",
    "eps.png": "EPS files are not supported",
    "text.png": "not an image file (unrecognised format)",
    "empty.jpg": "empty file",
    "random.png": "not an image file",
    "header_only.png": "corrupt or truncated PNG file",
    **{f"cut{c}.{e}": "truncated" for c in ("01", "05", "10", "30", "50", "70", "90", "99") for e in ("png", "jpg")},
}


@functools.lru_cache(maxsize=None)
def valid() -> dict[str, bytes]:
    out = {}

    def save(name, im, **kw):
        buf = io.BytesIO()
        im.save(buf, format={"jpg": "JPEG"}.get(name.rsplit(".", 1)[1], name.rsplit(".", 1)[1].upper()), **kw)
        out[name] = buf.getvalue()

    save("deep16.png", Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30))
    rgb16 = np.arange(6 * 5 * 3, dtype=">u2").reshape(6, 5, 3) * 700  # big-endian 16-bit RGB rows, by hand
    out["rgb16.png"] = _png(5, 6, depth=16, color=2,
                            rows=b"".join(b"\x00" + rgb16[r].tobytes() for r in range(6)))
    pal = Image.fromarray(np.arange(40 * 50, dtype=np.uint8).reshape(40, 50) % 16).convert("P")
    save("palette_alpha.png", pal, transparency=0)
    la = np.stack([np.full((10, 12), 40, np.uint8), np.tile(np.arange(0, 240, 20, dtype=np.uint8), (10, 1))], -1)
    save("la.png", Image.fromarray(la))  # (H, W, 2) uint8: mode LA
    save("onebit.png", Image.fromarray(np.eye(40, dtype=bool)))
    save("cmyk.jpg", Image.new("CMYK", (30, 20), (10, 200, 30, 5)))
    frames = [Image.new("RGB", (20, 20), (i * 80, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out["animated.gif"] = buf.getvalue()
    buf = io.BytesIO()
    frames[1].save(buf, format="PNG", save_all=True, append_images=[frames[2], frames[0]])
    out["animated.png"] = buf.getvalue()
    save("tiny.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    save("thin.png", Image.new("L", (5000, 1), 7))
    save("tall.png", Image.new("RGB", (1, 5000), (9, 8, 7)))
    arrow = np.zeros((6, 10, 3), np.uint8)  # asymmetric, so that every orientation gives different pixels
    arrow[1, 1:8] = 255
    arrow[2:5, 2, 0] = 200
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        save(f"exif{o}.png", Image.fromarray(arrow), exif=exif)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif6.jpg", Image.fromarray(np.repeat(np.repeat(arrow, 8, 0), 8, 1)), exif=exif, quality=95)
    save("gray.webp", Image.fromarray(np.full((9, 7), 99, np.uint8)), lossless=True)
    save("plain.bmp", Image.fromarray(arrow))
    save("plain.tiff", Image.fromarray(arrow))
    return out


def _write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _decodes(path: Path) -> bool:
    try:
        read_image(path)
    except ImageError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- read_image
def test_every_corrupt_file_is_decoded_or_refused_with_one_line(tmp_path):
    _write(tmp_path, corpus())
    refused = {}
    for name in corpus():
        path = tmp_path / name
        try:
            img = read_image(path)
        except ImageError as e:
            msg = str(e)
            assert msg.startswith(f"{path}: ") and "\n" not in msg and len(msg) < 400, msg
            assert e.path == str(path) and msg == f"{path}: {e.reason}"
            refused[name] = e.reason
        else:  # a flipped byte can leave a decodable image (libjpeg fills missing data with grey): a valid one
            assert name.startswith("flip") and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
            assert img.shape[1] * img.shape[2] <= MAX_PIXELS, name
    for name, words in REASONS.items():
        assert words in refused[name], (name, refused.get(name))
    assert len(refused) >= 40


def test_refusing_a_bomb_does_not_decode_it(tmp_path):
    import resource
    import time

    _write(tmp_path, {k: v for k, v in corpus().items() if "bomb" in k or "huge" in k})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for path in sorted(tmp_path.iterdir()):
        with pytest.raises(ImageError, match=path.name):
            read_image(path)
    # decoding the 144-Mpx bomb alone would need 144 MB (432 MB as RGB); the refusals read headers only
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # ru_maxrss is in kB
    assert time.perf_counter() - t0 < 2.0
    assert MAX_PIXELS < 12_000 * 12_000 < Image.MAX_IMAGE_PIXELS * 2


def test_max_pixels_is_the_only_limit_and_no_global_state_changes(tmp_path, monkeypatch):
    """Pillow's limit is a module global (``Image.MAX_IMAGE_PIXELS``) that ``Image.open`` checks with a
    warning; read_image neither reads nor writes it, nor touches warning filters, so it is thread-safe."""
    _write(tmp_path, {"a.png": _encoded("PNG"), "bomb.png": _png(12_000, 12_000)})
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Image.open would now refuse a.png (3072 pixels)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (3, 48, 64)
    with pytest.raises(ImageError, match=r"a.png: 64x48 = 3072 pixels exceeds max_pixels=3000 "):
        read_image(tmp_path / "a.png", max_pixels=3000)
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_pixels must be a positive int"):
            read_image(tmp_path / "a.png", max_pixels=bad)

    # concurrent reads of good files and bombs: each thread gets its own, correct answer
    want = read_image(tmp_path / "a.png")
    results, errors = [], []

    def work(i):
        for _ in range(10):
            try:
                results.append(torch.equal(read_image(tmp_path / "a.png"), want))
                read_image(tmp_path / "bomb.png")
            except ImageError as e:
                errors.append("bomb.png: 12000x12000" in str(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 40 and errors == [True] * 40
    assert warnings.filters == filters


def test_special_paths_are_refused_without_blocking(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # opening a FIFO for reading would block until a writer comes: never
    for name, why in {"folder.jpg": "is a directory, not an image", "missing.png": "no such file",
                      "pipe.png": "not a regular file"}.items():
        with pytest.raises(ImageError, match=why) as err:
            read_image(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: ")
    with pytest.raises(ImageError, match="cannot read"):
        read_image(str(tmp_path / "nul\x00.png"))
    with pytest.raises(ImageError, match=r"not a regular file"):
        read_image("/dev/zero")  # a device: would never end


def test_unreadable_file(tmp_path):
    p = tmp_path / "locked.png"
    p.write_bytes(_encoded("PNG"))
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        with pytest.raises(ImageError, match=r"locked.png: cannot read \(Permission denied\)"):
            read_image(p)
    finally:
        p.chmod(0o644)


def test_unusual_valid_files_decode_to_the_right_rgb(tmp_path):
    files = valid()
    _write(tmp_path, files)
    got = {name: read_image(tmp_path / name) for name in files}
    for name, img in got.items():
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and img.is_contiguous(), name

    def pil_rgb(name):  # Pillow's own conversion, the oracle where it is the right answer
        with Image.open(tmp_path / name) as im:
            return torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)

    deep = np.arange(40 * 50).reshape(40, 50) * 30
    assert torch.equal(got["deep16.png"][1], torch.from_numpy(np.floor(deep / 65535 * 255 + 0.5).astype(np.uint8)))
    assert torch.equal(got["rgb16.png"], pil_rgb("rgb16.png"))  # 16-bit RGB: the high byte
    assert got["rgb16.png"].max() > 200
    for name in ("cmyk.jpg", "onebit.png", "gray.webp", "plain.bmp", "plain.tiff", "tiny.png", "thin.png",
                 "tall.png"):
        assert torch.equal(got[name], pil_rgb(name)), name
    assert set(got["onebit.png"].unique().tolist()) == {0, 255}
    pal = got["palette_alpha.png"][0]  # index 0 is transparent -> white; the rest their grey palette colour
    idx = torch.from_numpy(np.arange(40 * 50).reshape(40, 50) % 16)
    assert (pal[idx == 0] == 255).all() and torch.equal(pal[idx == 5], torch.full_like(pal[idx == 5], 5))
    a = torch.arange(0, 240, 20, dtype=torch.float64) / 255  # LA: grey 40 over white with alpha a
    want = (40 * a + 255 * (1 - a)).round()
    assert ((got["la.png"].double() - want).abs() <= 1).all()
    assert got["animated.gif"].sum() == 0  # the first frame (black), not a blend of the frames
    assert got["animated.png"][0].unique().tolist() == [80] and got["animated.png"][1:].sum() == 0
    assert got["tiny.png"].flatten().tolist() == [1, 2, 3]
    assert got["thin.png"].shape == (3, 1, 5000) and got["tall.png"].shape == (3, 5000, 1)
    # EXIF orientation: upright as image viewers (and Pillow's exif_transpose) show it
    for o in range(1, 9):
        assert torch.equal(got[f"exif{o}.png"], pil_rgb(f"exif{o}.png")), o
    assert len({tuple(got[f"exif{o}.png"].flatten().tolist()) for o in range(1, 9)}) == 8
    assert got["exif6.jpg"].shape == (3, 80, 48) and torch.equal(got["exif6.jpg"], pil_rgb("exif6.jpg"))


def test_limit_aspect_bounds_memory_and_keeps_the_model_input(tmp_path):
    from funcam.models import Preprocess, preprocess

    cfg = Preprocess(size=32, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    for h, w in ((1, 5000), (3, 2001), (2000, 5), (40, 700), (40, 1300)):
        yy, xx = np.mgrid[:h, :w]
        img = torch.from_numpy(np.stack([127 + 100 * np.sin(xx / 9 + yy / 7 + c) for c in range(3)]).astype(np.uint8))
        band = limit_aspect(img)
        assert max(band.shape[1:]) <= MAX_ASPECT * min(band.shape[1:]) + 1
        assert band.shape == img.shape if max(h, w) <= MAX_ASPECT * min(h, w) else band.numel() < img.numel()
        # the model input equals the untrimmed one's up to a sub-pixel resampling offset (bicubic)
        full, trimmed = preprocess([img], cfg), preprocess([band], cfg)
        assert (full - trimmed).abs().max() < 0.1 and (full - trimmed).abs().mean() < 0.01, (h, w)
    huge = torch.zeros(3, 1, 50_000_000 // 3, dtype=torch.uint8)  # under max_pixels; untrimmed: 30 GB
    assert preprocess([limit_aspect(huge)], cfg).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------- command line, dataset
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    torch.save(timm.create_model(ARCH, pretrained=False, num_classes=10).state_dict(), path)
    return str(path)


def _model(checkpoint):
    from funcam.models import load_model

    return load_model(ARCH, checkpoint=checkpoint, num_classes=10)


def _expected_maps(checkpoint, paths, **kw):
    """The library's maps for these files: the oracle the command line and dataset outputs must equal."""
    from funcam.explain import explain
    from funcam.models import preprocess

    model, cfg = _model(checkpoint)
    x = preprocess([limit_aspect(read_image(p)) for p in paths], cfg)
    with torch.no_grad():
        return explain(model, x, method="gradcam", **kw)


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


def test_explain_reports_each_bad_file_and_explains_the_rest(tmp_path, capsys, checkpoint):
    from funcam.cli import main

    src = tmp_path / "in"
    bad = {k: v for k, v in corpus().items() if k in REASONS and not k.startswith("cut")}
    bad.update({"cut50.png": corpus()["cut50.png"], "cut50.jpg": corpus()["cut50.jpg"]})
    _write(src, bad)
    good = {k: valid()[k] for k in ("thin.png", "tall.png", "tiny.png", "exif6.jpg", "cmyk.jpg", "deep16.png")}
    _write(src, good)
    (src / "folder.jpg").mkdir()
    os.mkfifo(src / "pipe.png")
    odd = [os.fsdecode(os.fsencode(str(src)) + b"/bad\xff name.png"), str(src / "new\nline.png")]
    for p in odd:  # a non-UTF-8 byte and a newline in the name: still one line each, valid UTF-8 output
        Path(p).write_bytes(_encoded("PNG"))
    names = sorted(bad) + ["folder.jpg", "pipe.png", "missing.png"]
    args = [str(src / n) for n in names] + [str(src / n) for n in sorted(good)] + odd
    out = tmp_path / "out"
    code = main(["explain", *args, "--model", ARCH, "--checkpoint", checkpoint, "--num-classes", "10",
                 "--top-k", "2", "--format", "npz", "--batch-size", "3", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 1
    _no_traceback(cap.err)
    lines = cap.err.splitlines()
    assert len(lines) == len(names), cap.err
    # what a file's header shows is reported before the model loads, in argument order; a cut body (cut50.*)
    # only when its batch is decoded (issue 16)
    from funcam.images import ImageError, probe_image

    def header_refuses(n: str) -> bool:
        try:
            probe_image(src / n)
        except ImageError:
            return True
        return False

    late = [n for n in names if not header_refuses(n)]
    assert "cut50.png" in late and "empty.jpg" not in late
    for n, line in zip([n for n in names if n not in late] + late, lines):
        assert line.startswith(f"funcam: error: {src / n}: "), line
        if n in REASONS:
            assert REASONS[n] in line, line
    assert len(cap.out.splitlines()) == len(good) + 2  # one prediction line per explained image
    assert r"bad\udcff name.png: class " in cap.out and r"new\nline.png: class " in cap.out
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([Path(n).stem + ".npz" for n in good] + ["bad_name.npz", "new_line.npz"])
    ref = _expected_maps(checkpoint, [src / n for n in sorted(good)], top_k=2)
    for b, n in enumerate(sorted(good)):  # odd-shaped images get the library's maps, and real ones
        with np.load(out / f"{Path(n).stem}.npz") as z:
            assert z["classes"].tolist() == ref.classes[b].tolist()
            np.testing.assert_allclose(z["maps_gradcam"], ref.maps[b].numpy(), rtol=1e-4, atol=1e-5)
            assert np.isfinite(z["maps_gradcam"]).all()
            if n in ("exif6.jpg", "deep16.png"):  # the others are constant images: a zero map is possible
                assert z["maps_gradcam"].max() > 0

    # PNG output with the odd names: the gallery is written and valid UTF-8
    code = main(["explain", *odd, str(src / "text.png"), "--model", ARCH, "--checkpoint", checkpoint,
                 "--num-classes", "10", "--top-k", "1", "--quiet", "--out", str(tmp_path / "png")])
    cap = capsys.readouterr()
    assert code == 1 and cap.out == "" and cap.err.count("\n") == 1 and "text.png: not an image" in cap.err
    page = (tmp_path / "png" / "index.html").read_text(encoding="utf-8")
    assert r"bad\udcff name.png" in page and r"new\nline.png" in page


def test_explain_with_no_readable_image_exits_2_and_writes_nothing(tmp_path, capsys, checkpoint):
    from funcam.cli import main

    _write(tmp_path, {"a.png": b"", "b.jpg": _encoded("JPEG")[:300]})
    code = main(["explain", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--model", ARCH, "--checkpoint",
                 checkpoint, "--num-classes", "10", "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert code == 2 and cap.out == "" and not (tmp_path / "out").exists()
    lines = cap.err.splitlines()
    assert len(lines) == 2 and lines[0] == f"funcam: error: {tmp_path / 'a.png'}: empty file"
    assert lines[1].startswith(f"funcam: error: {tmp_path / 'b.jpg'}: corrupt or truncated"), lines


def test_explain_dir_records_the_corpus_in_errors_jsonl(tmp_path, capsys, checkpoint):
    from funcam._src.app.shards import load_maps
    from funcam.cli import main

    img = tmp_path / "img"
    files = corpus()
    picked = {k: v for k, v in files.items() if k in REASONS or k.startswith("flip0")}
    _write(img, picked)
    good = {k: valid()[k] for k in ("thin.png", "tall.png", "tiny.png", "exif6.jpg", "animated.gif", "la.png")}
    _write(img / "ok", good)
    (img / "folder.jpg").mkdir()  # a folder with an image suffix: walked, not listed
    (img / "folder.jpg" / "inner.png").write_bytes(valid()["plain.bmp"])  # BMP bytes under a .png name: fine
    os.mkfifo(img / "pipe.png")
    os.symlink("..", img / "ok" / "up")  # two links back up: walked once each, no loop, no repeats
    os.symlink(".", img / "self")
    out = tmp_path / "out"
    code = main(["explain-dir", str(img), "--out", str(out), "--model", ARCH, "--checkpoint", checkpoint,
                 "--top-k", "2", "--batch-size", "4", "--shard-size", "16", "--workers", "0", "--quiet"])
    cap = capsys.readouterr()
    # the refusals are data (errors.jsonl) and each is named on stderr as it is met; exit 1: some unreadable
    assert code == 1 and cap.out == ""
    errors = {e["path"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    from funcam._src.app.images import printable

    assert sorted(cap.err.splitlines()) == sorted(f"funcam: error: {printable(p)}: {r}" for p, r in errors.items())
    decodable = {n for n in picked if _decodes(img / n)}
    assert set(errors) == (set(picked) - decodable) | {"pipe.png"}
    for name, words in REASONS.items():
        assert words in errors[name] and "\n" not in errors[name], (name, errors[name])
    assert errors["pipe.png"].startswith("not a regular file")
    maps = {p: (m, c) for chunk in load_maps(str(out)) for p, m, c in zip(chunk.paths, chunk.maps, chunk.classes)}
    want = sorted([f"ok/{n}" for n in good] + ["folder.jpg/inner.png"] + sorted(decodable))
    assert sorted(maps) == want  # every good file once, none through the links
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["path"] for r in manifest) == sorted(want + list(errors))
    paths = [f"ok/{n}" for n in sorted(good)]
    ref = _expected_maps(checkpoint, [img / p for p in paths], top_k=2)
    for b, p in enumerate(paths):
        assert torch.equal(maps[p][1], ref.classes[b])
        torch.testing.assert_close(maps[p][0].float(), ref.maps[b].half().float(), rtol=2e-3, atol=1e-6)
    assert maps["ok/exif6.jpg"][0].float().max() > 0 and maps["ok/la.png"][0].float().max() > 0


def test_explain_dir_list_file_problems(tmp_path, capsys, checkpoint):
    from funcam.cli import main

    img = tmp_path / "img"
    _write(img, {"a.png": _encoded("PNG")})
    base = ["explain-dir", str(img), "--out", str(tmp_path / "out"), "--model", ARCH, "--checkpoint", checkpoint,
            "--workers", "0", "--quiet"]
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    for lst, why in ((tmp_path / "binary.txt", "is not a UTF-8 text file"), (tmp_path / "none.txt", "cannot be read")):
        assert main([*base, "--list", str(lst)]) == 2
        cap = capsys.readouterr()
        assert cap.err.count("\n") == 1 and cap.err.startswith(f"funcam: error: --list '{lst}' {why}"), cap.err
    (tmp_path / "list.txt").write_text("a.png\nmissing.png\n../img/a.png\nbad\x01name.png\n")
    assert main([*base, "--list", str(tmp_path / "list.txt")]) == 1  # some listed files unreadable (issue 16)
    cap = capsys.readouterr()
    _no_traceback(cap.err)
    assert sorted(cap.err.splitlines()) == ["funcam: error: bad\\x01name.png: no such file",
                                            "funcam: error: missing.png: no such file"]
    lines = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    errors = {e["path"]: e["error"] for e in map(json.loads, lines)}
    assert errors == {"missing.png": "no such file", "bad\x01name.png": "no such file"}


def test_list_images_survives_symlink_loops(tmp_path):
    from funcam._src.app.folder import list_images

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"")
    (tmp_path / "y.jpg").write_bytes(b"")
    for i in range(3):  # 3 links up per level would make 3**40 paths before the OS stops the recursion
        os.symlink("../..", tmp_path / "a" / "b" / f"up{i}")
        os.symlink(".", tmp_path / f"self{i}")
    assert list_images(str(tmp_path)) == ["a/b/x.png", "y.jpg"]
