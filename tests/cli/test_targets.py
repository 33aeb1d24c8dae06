"""``funcam explain --prompts`` (CLIP) and ``--boxes`` (detectors): the maps the command writes equal the library call
``funcam.explain.explain(model, x, classes=funcam.targets.prompts(...) / boxes(...))`` on the same input, built here
from the same checkpoint; each box is drawn on its map; a box without a match is said to be one; bad input is one
``funcam: error:`` line, exit 2, before any model loads.

In this process (``main``), with tiny random-weight models saved to checkpoints: an open_clip ModifiedResNet at
64 x 64 (a config JSON, as a user's custom architecture), torchvision's SSDlite (its 3.4 M parameters are the
smallest torchvision detector; at random weights it keeps 300 detections of about 1/91 each).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import funcam
from funcam.cli import main
from funcam.explain import explain
from funcam.models import Preprocess, preprocess

TEXT = ["a cat", "a dog", "a red car"]
CLIP_CFG = dict(embed_dim=16, vision_cfg=dict(layers=[1, 1, 1, 1], width=8, image_size=64, head_width=8),
                text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two noise images (48 x 64 and 80 x 72), the tiny CLIP's config JSON and state dict."""
    import open_clip

    d = tmp_path_factory.mktemp("targets")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(d / "b.png")
    (d / "clip.json").write_text(json.dumps(CLIP_CFG))
    torch.manual_seed(1)
    torch.save(open_clip.CLIP(**CLIP_CFG).state_dict(), d / "clip.pt")
    return d


def _image(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def test_prompt_maps_equal_the_library_call(files, tmp_path, capsys):
    import open_clip

    torch.set_num_threads(1)
    args = ["explain", str(files / "a.png"), str(files / "b.png"), "--model", f"open_clip:{files / 'clip.json'}",
            "--checkpoint", str(files / "clip.pt"), "--prompts", ",".join(TEXT), "--signed", "--device", "cpu"]
    assert main([*args, "--format", "npz", "--out", str(tmp_path / "n"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    # the library call on the same model, input and prompts, each built here from open_clip's own pieces
    model = open_clip.CLIP(**CLIP_CFG)
    model.load_state_dict(torch.load(files / "clip.pt", weights_only=True))
    model.eval()
    pre = Preprocess(64, 1.0, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, "bicubic")
    x = preprocess([_image(files / "a.png"), _image(files / "b.png")], pre)
    with torch.no_grad():
        text = model.encode_text(open_clip.tokenize(TEXT))
    score = funcam.targets.prompts(text, logit_scale=model.logit_scale.exp())
    want = explain(model, x, method="gradcam", classes=score, relu=False)
    probs = score(want.logits).softmax(-1)
    for b, name in enumerate(("a", "b")):
        with np.load(tmp_path / "n" / f"{name}.npz") as z:
            assert z["prompts"].tolist() == TEXT and z["maps_gradcam"].shape == (3, 2, 2)
            np.testing.assert_allclose(z["maps_gradcam"], want.maps[b].numpy(), rtol=1e-4, atol=1e-6)
            assert np.abs(z["maps_gradcam"]).min() > 0
            assert z["captions"].tolist() == [f"{t} {p:.2f}" for t, p in zip(TEXT, probs[b].tolist())]
            np.testing.assert_allclose(z["scores"], score(want.logits)[b].numpy(), rtol=1e-5)
    # the pictures: one overlay per prompt, captioned with the prompt text
    assert main([*args, "--out", str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines()[0] == f"{files / 'a.png'}: " + ", ".join(
        f"{t} {p:.2f}" for t, p in zip(TEXT, probs[0].tolist()))
    page = (tmp_path / "p" / "index.html").read_text()
    for k, t in enumerate(TEXT):
        assert (tmp_path / "p" / f"a_gradcam_p{k}.png").is_file() and f"Grad-CAM: {t} (" in page


def _hf_clip(d):
    """A tiny Hugging Face CLIPModel saved with its tokenizer (a byte-level vocabulary, no merges) in folder d."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab, [])
    torch.manual_seed(0)
    special = dict(bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(vocab), max_position_embeddings=32, **special)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return model, tokenizer


def test_hugging_face_clip_folder(files, tmp_path, capsys):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.set_num_threads(1)
    model, tokenizer = _hf_clip(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["explain", str(files / "a.png"), "--model", f"hf:{tmp_path / 'hf'}", "--prompts", ",".join(TEXT),
                 "--signed", "--format", "npz", "--out", str(tmp_path / "n"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    x = preprocess([_image(files / "a.png")], Preprocess(64, 1.0, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"))
    with torch.no_grad():
        text = model.get_text_features(**tokenizer(TEXT, padding=True, return_tensors="pt")).pooler_output
    score = funcam.targets.prompts(text, logit_scale=model.logit_scale.exp())
    want = explain(model, x, method="gradcam", classes=score, relu=False).maps[0].numpy()
    with np.load(tmp_path / "n" / "a.npz") as z:
        np.testing.assert_allclose(z["maps_gradcam"], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        assert np.abs(want).max() > 0 and z["prompts"].tolist() == TEXT


def _detector(kind: str, d):
    """(model name for --model, the model, its input x (1, 3, H, W) from c.png as the command line prepares it): an
    Ultralytics YOLO11n with 5 classes (zero class biases: every score 0.5, as in tests/cuts/test_detection.py),
    torchvision's Faster R-CNN MobileNet-v3 320 FPN (91 classes; class 1's bias 8, so that its detections pass the
    score threshold at random weights). Random weights, saved as a state dict to ``d / {kind}.pt``."""
    torch.manual_seed(0)
    image = _image(d / "c.png").float() / 255
    if kind == "yolo":
        import warnings

        from ultralytics.nn.tasks import DetectionModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DetectionModel("yolo11n.yaml", nc=5, verbose=False).eval()
        with torch.no_grad():
            for branch in model.model[-1].cv3:
                branch[-1].bias.zero_()
        name, x = "yolo:yolo11n.yaml", torch.nn.functional.pad(image[None], (0, 6, 0, 8), value=114 / 255)
    else:
        from torchvision.models import detection as D

        model = D.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.bias[1] = 8.0
        name, x = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", image[None]
    torch.save(model.state_dict(), d / f"{kind}.pt")
    return name, model, x


@pytest.mark.parametrize("kind", ["yolo", pytest.param("fasterrcnn", marks=pytest.mark.slow)])
def test_box_maps_equal_the_library_call_and_are_drawn(files, tmp_path, capsys, kind):
    torch.set_num_threads(1)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (184, 250, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    name, model, x = _detector(kind, tmp_path)
    sp = funcam.split(model)
    with torch.no_grad():
        (dets,) = sp.head(sp.extract(x))
    b = dets["boxes"].round()
    inside = (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= 250) & (b[:, 3] <= 184)
    ref, lab = b[inside][:2], dets["labels"][inside][:2]  # two of its detections, as a user would type them
    assert ref.shape == (2, 4)
    spec = f"{','.join(f'{v:g}' for v in ref[0].tolist())}:{int(lab[0])};" \
           f"{','.join(f'{v:g}' for v in ref[1].tolist())};1,1,5,5:1"  # box 2 takes its best overlap's label
    args = ["explain", str(tmp_path / "c.png"), "--model", name, "--checkpoint", str(tmp_path / f"{kind}.pt"),
            "--boxes", spec, "--device", "cpu"]
    assert main([*args, "--format", "npz", "--out", str(tmp_path / "n"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err == f"funcam: warning: {tmp_path / 'c.png'}: box 3 (1,1,5,5) matches no detection (IoU > 0.5 with " \
                  f"its label): its map is zero\n"
    labels = torch.cat([lab, torch.tensor([1])])
    with pytest.warns(funcam.targets.UnmatchedBoxWarning, match=r"\(image, box\) \[\[0, 2\]\]"):
        want = explain(model, x, method="gradcam", classes=funcam.targets.boxes(
            torch.cat([ref, torch.tensor([[1.0, 1, 5, 5]])]), labels)).maps[0].numpy()
    assert want[:2].min(axis=(1, 2)).max() >= 0 and (want[:2].max(axis=(1, 2)) > 0).all()
    with np.load(tmp_path / "n" / "c.npz") as z:
        assert z["box_labels"].tolist() == labels.tolist() and z["matched"].tolist() == [True, True, False]
        np.testing.assert_allclose(z["maps_gradcam"], want, rtol=1e-4, atol=1e-4 * want.max())
        assert not z["maps_gradcam"][2].any() and z["captions"][2].endswith("no match")
        assert z["scores"][2] == 0 and (z["scores"][:2] > 0.5).all()  # no match: 0; else IoU > 0.5 + its score
    # the pictures: each box outlined in white (2 px just inside its edge) on its own map
    assert main([*args, "--out", str(tmp_path / "p"), "--quiet"]) == 0
    capsys.readouterr()
    for k, (x0, y0, x1, y1) in enumerate(ref.long().tolist()):
        got = _image(tmp_path / "p" / f"c_gradcam_box{k + 1}.png")
        assert (got[:, y0:y0 + 2, x0:x1] == 255).all() and (got[:, y1 - 2:y1, x0:x1] == 255).all()
        assert (got[:, y0:y1, x0:x0 + 2] == 255).all() and (got[:, y0:y1, x1 - 2:x1] == 255).all()
        assert not (got[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2] == 255).all(dim=0).any()  # an outline: no white inside
    page = (tmp_path / "p" / "index.html").read_text()
    first = "person" if kind == "fasterrcnn" else "1"  # COCO label 1 (torchvision ships the names); YOLO: 5 classes
    assert f"box 3: {first} (no match: zero map)" in page


def _hf_folder(d, *, tokenizer: bool):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (d / "model.safetensors").write_bytes(b"x")
    if tokenizer:
        (d / "vocab.json").write_text("{}")
    return d


BAD = [  # (arguments after the image, the one stderr line after "funcam: error: ", as a regex)
    (["--prompts", "a cat,a dog"], re.escape("--prompts applies to CLIP models (--model open_clip:ARCH or "
                                             "hf:FOLDER); the default model efficientnet_lite0 is a classifier; use "
                                             "--classes or --top-k")),
    (["--model", "resnet18", "--random-weights", "--boxes", "1,2,3,4"],
     re.escape("--boxes applies to detectors (--model torchvision:NAME or yolo:CONFIG); --model resnet18 is a "
               "classifier; use --classes or --top-k")),
    (["--model", "open_clip:RN50", "--random-weights", "--boxes", "1,2,3,4"],
     re.escape("--boxes applies to detectors (--model torchvision:NAME or yolo:CONFIG); --model open_clip:RN50 is "
               "a CLIP model; use --prompts")),
    (["--model", "open_clip:RN50", "--random-weights", "--prompts", " , "],
     re.escape("--prompts: expected comma-separated text prompts like 'a cat,a dog' (none empty), got ' , '")),
    (["--model", "open_clip:RN50", "--random-weights"],
     re.escape("--model open_clip:RN50 explains prompts, not classes: add --prompts 'a cat,a dog'")),
    (["--model", "open_clip:RN50", "--random-weights", "--prompts", "a", "--top-k", "2"],
     re.escape("--top-k does not apply with --prompts (one map per prompt)")),
    (["--model", "open_clip:RN5O", "--random-weights", "--prompts", "a"],
     re.escape("unknown open_clip architecture 'RN5O'; did you mean 'RN50'") + ".*"),
    (["--model", "open_clip:ViT-B-16-SigLIP", "--random-weights", "--prompts", "a"],
     re.escape("open_clip:ViT-B-16-SigLIP tokenizes with the Hugging Face tokenizer 'timm/ViT-B-16-SigLIP', which "
               "is not bundled with open_clip and funcam downloads nothing; ") + ".*"),
    (["--model", "torchvision:ssdlite320_mobilenet_v3_large", "--random-weights", "--boxes", "1,2,3"],
     re.escape("--boxes: box 1 '1,2,3' of '1,2,3': expected x0,y0,x1,y1 or x0,y0,x1,y1:label with four numbers")),
    (["--model", "torchvision:ssdlite320_mobilenet_v3_large", "--random-weights", "--boxes", "1,2,3,4;9,2,3,4"],
     re.escape("--boxes: box 2 '9,2,3,4' of '1,2,3,4;9,2,3,4': expected x0 < x1 and y0 < y1 (top-left, then "
               "bottom-right corner)")),
    (["--model", "torchvision:ssdlite320_mobilenet_v3_large", "--random-weights", "--boxes", "1,2,3,4:"],
     re.escape("--boxes: box 1 '1,2,3,4:' of '1,2,3,4:': expected a label after ':'")),
    (["--model", "torchvision:ssdlite320_mobilenet_v3_large", "--random-weights", "--boxes", "10,20,65,30"],
     re.escape("--boxes: box 1 (10,20,65,30) lies outside {img} (64x48 pixels): expected 0 <= x0 < x1 <= 64, "
               "0 <= y0 < y1 <= 48")),
    (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_320", "--random-weights", "--boxes", "1,2,3,4"],
     re.escape("unknown torchvision detector 'fasterrcnn_mobilenet_v3_large_320'; did you mean "
               "'fasterrcnn_mobilenet_v3_large_320_fpn'") + ".*"),
    (["--model", "torchvision:ssdlite320_mobilenet_v3_large", "--boxes", "1,2,3,4"],
     re.escape("torchvision:ssdlite320_mobilenet_v3_large needs weights: --checkpoint FILE (a state dict), or "
               "--random-weights (an untrained network: its detections and maps mean nothing)")),
    (["--model", "torchvision:ssdlite320_mobilenet_v3_large", "--pretrained", "--boxes", "1,2,3,4"],
     re.escape("--pretrained applies to timm models; --model torchvision:ssdlite320_mobilenet_v3_large takes "
               "--checkpoint FILE (a state dict; funcam downloads nothing)")),
    (["--model", "hf:{tmp}/hf", "--prompts", "a"],
     re.escape("hf:{tmp}/hf: no tokenizer: tokenizer.json, or vocab.json and merges.txt, is needed (merges.txt "
               "missing)")),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_target_options_are_one_line_before_the_model_loads(files, tmp_path, capsys, monkeypatch, args,
                                                                 message):
    from funcam._src.app import families

    for f in families.FAMILIES.values():  # nothing may be built: every case is refused from the options
        monkeypatch.setitem(families.FAMILIES, f.prefix, f._replace(load=None))
    _hf_folder(tmp_path / "hf", tokenizer=True)
    img = str(files / "a.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["explain", img, *args, "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    message = message.replace(re.escape("{img}"), re.escape(img)).replace(re.escape("{tmp}"), re.escape(str(tmp_path)))
    assert out == "" and len(err.splitlines()) == 1 and re.fullmatch("funcam: error: " + message, err.strip()), err
    assert not (tmp_path / "o").exists()


def test_explain_dir_refuses_prompt_and_box_models(files, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes((files / "a.png").read_bytes())
    assert main(["explain-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--model", "open_clip:RN50",
                 "--random-weights"]) == 2
    assert capsys.readouterr().err == "funcam: error: --model open_clip:RN50 explains prompts, which this command " \
                                      "does not take; use funcam explain IMAGE... --prompts ...\n"


@pytest.mark.parametrize("model,module,package", [("open_clip:RN50", "open_clip", "open_clip_torch"),
                                                  ("yolo:yolo11n.yaml", "ultralytics", "ultralytics")])
def test_a_missing_optional_library_is_named_with_its_install(files, tmp_path, capsys, monkeypatch, model, module,
                                                              package):
    # open_clip, transformers and ultralytics are optional: without one, its --model prefix says what to install
    # instead of an ImportError's traceback
    from funcam._src.app import families

    real = families.find_spec
    monkeypatch.setattr(families, "find_spec", lambda name: None if name == module else real(name))
    flag = ["--prompts", "a"] if model.startswith("open_clip") else ["--boxes", "1,2,3,4"]
    assert main(["explain", str(files / "a.png"), "--model", model, "--random-weights", *flag,
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"funcam: error: --model {model} needs the package {package}, which is not "
                                       f"installed: pip install {package}\n")
