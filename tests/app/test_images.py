"""Image reading (funcam/_src/app/images.py): every mode converted to upright RGB, bad files refused with the
file's name, and the header probe agreeing with the full decode (hostile files: test_fuzz_files.py)."""
import os

import numpy as np
import pytest
import torch

from funcam.images import ImageError, probe_image, read_image


def _save(tmp_path, name, arr, mode=None):
    from PIL import Image

    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p) if mode else Image.fromarray(arr).save(p)
    return p


def test_read_image_converts_gray_rgba_16bit_palette(tmp_path):
    from PIL import Image

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_save(tmp_path, "g.png", gray))
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 4) and (out == torch.from_numpy(gray)).all()

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red stays red
    rgba[0, 1] = (0, 0, 255, 0)        # transparent -> white background
    rgba[1, :] = (0, 0, 0, 128)        # half-transparent black on white -> mid grey
    out = read_image(_save(tmp_path, "a.png", rgba))
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[:, 1, 0].tolist())

    deep = np.array([[0, 65535], [32768, 256]], dtype=np.uint16)
    p = tmp_path / "d16.png"
    Image.fromarray(deep).save(p)
    out = read_image(p)
    assert out[0].tolist() == [[0, 255], [128, 1]] and torch.equal(out[0], out[2])  # full range, not clipped

    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[:, 0].T.tolist() == [[10, 20, 30], [200, 100, 0]]


def test_read_image_refuses_bad_files(tmp_path):
    good = _save(tmp_path, "good.png", np.full((64, 64, 3), 7, dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {"trunc.png": "corrupt or truncated", "text.png": "not an image file", "empty.jpg": "empty file",
             "missing.png": "no such file"}
    for name, why in cases.items():
        with pytest.raises(ImageError, match=why) as err:
            read_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="max_pixels"):
        read_image(good, max_pixels=100)


def test_probe_image_agrees_with_read_image_from_the_header(tmp_path):
    good = _save(tmp_path, "good.png", np.full((30, 50, 3), 7, dtype=np.uint8))
    assert probe_image(good) == (50, 30) and tuple(read_image(good).shape) == (3, 30, 50)
    data = good.read_bytes()
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.png")  # refused from stat: opening it would block forever
    for name in ("text.png", "empty.jpg", "missing.png", "pipe.png"):
        with pytest.raises(ImageError) as probed:
            probe_image(tmp_path / name)
        with pytest.raises(ImageError) as read:
            read_image(tmp_path / name)
        assert str(probed.value) == str(read.value) and probed.value.reason == read.value.reason
    with pytest.raises(ImageError, match="exceeds max_pixels=100"):
        probe_image(good, max_pixels=100)
    # damage only decoding finds: the header is intact, so the probe passes and read_image refuses
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 30])
    assert probe_image(tmp_path / "cut.png") == (50, 30)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_image(tmp_path / "cut.png")
