"""Hostile image files: every one is decoded or refused with a one-line ``ImageError`` naming it; a dataset run
and the command line skip them, keep going, and print no traceback.

The corpus is generated: a PNG and a JPEG cut at many points and with seeded random byte flips, random bytes,
headers claiming huge sizes, decompression bombs (a few hundred kB that decode to over 100 megapixels), and
unusual but valid files (16-bit, palette with transparency, 1-bit, CMYK, animated GIF, 1x1, 1x5000).
"""
from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from funcam.images import MAX_PIXELS, ImageError, read_image


def _png(w: int, h: int, *, mode_bits: tuple[int, int] = (8, 0), rows: bytes | None = None, idat: bytes | None = None) -> bytes:
    """A PNG written by hand: ``idat`` as given, or zlib of ``rows`` (default: all-zero rows, streamed)."""
    depth, color = mode_bits

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        comp = zlib.compressobj(9)
        row = b"\x00" + bytes((w * depth + 7) // 8 * (3 if color == 2 else 1))
        parts = [comp.compress(row) for _ in range(h)] if rows is None else [comp.compress(rows)]
        idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :64]
    arr = np.stack([np.sin(xx / 5 + c) * 100 + 120 + rng.integers(0, 20, (48, 64)) for c in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _corpus() -> dict[str, bytes]:
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
    files["bomb_gray.png"] = _png(12_000, 12_000)  # 144 Mpx of zeros: PIL's own warning range
    files["bomb_1bit.png"] = _png(40_000, 40_000, mode_bits=(1, 0))  # 1.6 Gpx: PIL's error range
    files["over_limit.png"] = _png(8_000, 8_000)  # 64 Mpx: above funcam's 50 Mpx, below PIL's limits
    files["text.png"] = b"this is not an image\n"
    files["empty.jpg"] = b""
    return files


def _valid() -> dict[str, bytes]:
    out = {}

    def save(name, im, **kw):
        buf = io.BytesIO()
        im.save(buf, format=name.rsplit(".", 1)[1].replace("jpg", "jpeg").upper(), **kw)
        out[name] = buf.getvalue()

    save("deep16.png", Image.fromarray((np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30)))
    pal = Image.fromarray(np.arange(40 * 50, dtype=np.uint8).reshape(40, 50) % 16).convert("P")
    save("palette_alpha.png", pal, transparency=0)
    save("onebit.png", Image.fromarray(np.eye(40, dtype=bool)))
    save("cmyk.jpg", Image.new("CMYK", (30, 20), (10, 200, 30, 5)))
    frames = [Image.new("RGB", (20, 20), (i * 80, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out["animated.gif"] = buf.getvalue()
    save("tiny.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    save("thin.png", Image.new("L", (5000, 1), 7))
    return out


def test_every_corrupt_file_is_decoded_or_refused_with_one_line(tmp_path):
    refused = {}
    for name, data in _corpus().items():
        path = tmp_path / name
        path.write_bytes(data)
        try:
            img = read_image(path)
        except ImageError as e:
            msg = str(e)
            assert msg.startswith(f"{path}: ") and "\n" not in msg and len(msg) < 400, msg
            refused[name] = msg
        else:  # a flipped byte in pixel data can leave a decodable image: then it must be a valid one
            assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and img.numel() > 0, name
    for name in ("huge_header.png", "bomb_gray.png", "bomb_1bit.png", "over_limit.png"):
        assert "max_pixels" in refused[name] or "decompression bomb" in refused[name], refused[name]
    assert "not an image" in refused["text.png"] and "empty" in refused["empty.jpg"]
    assert all(f"cut{c}" in " ".join(refused) for c in ("00", "05", "50", "90"))  # truncations never pass
    assert len(refused) >= 25


def test_refusing_a_bomb_does_not_decode_it(tmp_path):
    import resource

    path = tmp_path / "bomb.png"
    path.write_bytes(_png(12_000, 12_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="bomb.png"):
        read_image(path)
    # decoding would need 144 MB for the pixels alone; the refusal reads the header only
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # ru_maxrss is in kB
    assert MAX_PIXELS < 12_000 * 12_000


def test_unusual_valid_files_decode_to_rgb(tmp_path):
    for name, data in _valid().items():
        path = tmp_path / name
        path.write_bytes(data)
        img = read_image(path)
        with Image.open(path) as im:
            w, h = im.size
        assert img.shape == (3, h, w) and img.dtype == torch.uint8, name
    gif = read_image(tmp_path / "animated.gif")
    assert gif[0].max() == 0 and gif.sum() == 0  # the first frame (black), not a blend of the frames


def test_dataset_run_and_cli_skip_the_corpus_without_traceback(tmp_path, capsys):
    import timm

    from funcam.cli import main as funcam_main
    from funcam.dataset import explain_dataset
    from funcam.models import Preprocess

    img = tmp_path / "img"
    img.mkdir()
    corpus = _corpus()
    picked = {k: v for k, v in corpus.items() if k.startswith(("cut", "random", "huge", "bomb", "text", "empty"))}
    for name, data in picked.items():
        (img / name).write_bytes(data)
    (img / "good.png").write_bytes(_encoded("PNG"))
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    cfg = Preprocess(size=64, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    summary = explain_dataset(str(img), str(tmp_path / "out"), model, cfg, method="gradcam", top_k=1, batch_size=4,
                              shard_size=8, progress=False)
    errors = {json.loads(line)["path"] for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()}
    decodable = {n for n in picked if _decodes(img / n)}
    assert errors == set(picked) - decodable and "good.png" not in errors
    assert summary.errors == len(errors) and summary.images == len(picked) + 1

    bad = [img / n for n in sorted(picked)[:6]]
    code = funcam_main(["explain", *map(str, bad), str(img / "good.png"), "--out", str(tmp_path / "cli"),
                        "--model", "resnet18", "--top-k", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("funcam: error: ") for line in lines), err
    assert any(p.name.startswith("good") for p in (tmp_path / "cli").iterdir())


def _decodes(path: Path) -> bool:
    try:
        read_image(path)
    except ImageError:
        return False
    return True
