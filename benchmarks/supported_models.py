"""Which models funcam explains: the default cut, its layout and the methods that apply, for common architectures
from timm, torchvision and Hugging Face transformers, each checked against an autograd oracle.

    python benchmarks/supported_models.py [--only vit,swin] [--threads 1] [--limit 600]

For each model (random weights; parameters that are all zero - classifier heads, layer scales, last batch-norm
gammas that libraries zero-initialise - get N(0, 0.02) noise, so every gradient can be non-zero), B=2 images at the
model's smallest cheap input size (the first of its sizes at which the model itself runs):

* ``funcam.split(model, example=x)`` with no ``layer=``: the default cut (``split.layers``) and its layout (the cut
  value's shape: NCHW, NHWC or tokens with prefix tokens; "timm" when timm's ``forward_features`` / token route
  cut it, "graph" for the captured-graph route);
* ``head(extract(x)) == model(x)`` (the first output: logits, a ModelOutput's ``logits``, a dict's ``out``);
* Grad-CAM for K=3 classes in one call against a per-class ``torch.autograd.grad`` loop on the same split (the max
  error relative to the map's scale); the maps must not be all zero;
* ``funcam.chefer_relevance`` (transformers with self-attention over one token sequence) and
  ``funcam.guided_backprop`` (ReLU networks): "ok", or the one-line reason funcam gives for refusing;
* LRP (``funcam._src.core.lrp.lrp``) with AttnLRP, CP-LRP and zennit's EpsilonPlus: "ok" with each rule set's
  conservation error, or the refusal.

Rows are kept in ``benchmarks/supported_models.json`` (merged by id, so ``--only`` runs add to it) and the Markdown
table of every row run so far is written to ``benchmarks/supported_models.md`` and printed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import funcam  # noqa: E402
from funcam._src.core.lrp import as_method, lrp_budget  # noqa: E402
from funcam._src.core.split import Features  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = [0, 1, 2]  # K=3
TOL = 1e-4  # relative: float32 maps against the float32 loop


class Row(NamedTuple):
    id: str
    family: str
    library: str
    build: Callable[[int], nn.Module]  # input size -> model
    sizes: tuple  # input sizes to try, smallest first
    scores: Callable | None = None  # classes= callable for a model whose output is not logits


def timm_model(name: str, sized: bool = True, **kw: Any) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import timm

        extra = {"img_size": size} if sized else {}
        return timm.create_model(name, pretrained=False, num_classes=10, **extra, **kw)
    return build


def tv_model(name: str, sized: bool = False, **kw: Any) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import torchvision

        extra = {"image_size": size} if sized else {}
        return torchvision.models.get_model(name, weights=None, num_classes=10, **extra, **kw)
    return build


def tv_segmentation(size: int) -> nn.Module:
    import torchvision

    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=4)


def hf_model(kind: str) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import transformers as T

        vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   image_size=size, num_labels=10)
        if kind == "vit":
            return T.ViTForImageClassification(T.ViTConfig(patch_size=8, **vit))
        if kind == "deit":
            return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(patch_size=8, **vit))
        if kind == "dinov2":
            return T.Dinov2ForImageClassification(T.Dinov2Config(
                patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                image_size=size, num_labels=10))
        if kind == "swin":
            return T.SwinForImageClassification(T.SwinConfig(
                image_size=size, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                num_labels=10))
        if kind == "convnext":
            return T.ConvNextForImageClassification(T.ConvNextConfig(
                hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10))
        if kind == "resnet":
            return T.ResNetForImageClassification(T.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                num_labels=10))
        raise ValueError(kind)
    return build


def seg_scores(out: Any) -> Tensor:
    """A segmentation model's dict -> (B, 3): the mean logit of classes 0-2 over the image."""
    return out["out"][:, :3].mean(dim=(2, 3))


S, M, L = (64, 224), (64, 128, 224), (224, 256)
ROWS = [
    Row("timm-resnet", "ResNet", "timm `resnet18`", timm_model("resnet18", sized=False), S),
    Row("timm-convnext", "ConvNeXt", "timm `convnext_atto`", timm_model("convnext_atto", sized=False), S),
    Row("timm-efficientnet", "EfficientNet", "timm `efficientnet_b0`", timm_model("efficientnet_b0", sized=False), S),
    Row("timm-vgg", "VGG", "timm `vgg11`", timm_model("vgg11", sized=False), S),
    Row("timm-densenet", "DenseNet", "timm `densenet121`", timm_model("densenet121", sized=False), S),
    Row("timm-regnet", "RegNet", "timm `regnetx_002`", timm_model("regnetx_002", sized=False), S),
    Row("timm-mobilenetv3", "MobileNetV3", "timm `mobilenetv3_small_050`",
        timm_model("mobilenetv3_small_050", sized=False), S),
    Row("timm-vit-cls", "ViT (CLS token)", "timm `vit_tiny_patch16_224`", timm_model("vit_tiny_patch16_224"), S),
    Row("timm-vit-avg", "ViT (average pool)", "timm `vit_tiny_patch16_224`, `global_pool='avg'`",
        timm_model("vit_tiny_patch16_224", global_pool="avg"), S),
    Row("timm-deit", "DeiT", "timm `deit_tiny_patch16_224`", timm_model("deit_tiny_patch16_224"), S),
    Row("timm-deit-distilled", "DeiT distilled", "timm `deit_tiny_distilled_patch16_224`",
        timm_model("deit_tiny_distilled_patch16_224"), S),
    Row("timm-dinov2-reg", "DINOv2 + registers", "timm `vit_small_patch14_reg4_dinov2`",
        timm_model("vit_small_patch14_reg4_dinov2"), (56, 224)),
    Row("timm-beit", "BEiT", "timm `beit_base_patch16_224`, depth 2", timm_model("beit_base_patch16_224", depth=2), S),
    Row("timm-eva02", "EVA-02", "timm `eva02_tiny_patch14_224`", timm_model("eva02_tiny_patch14_224"), (56, 224)),
    Row("timm-deit3", "DeiT III", "timm `deit3_small_patch16_224`", timm_model("deit3_small_patch16_224"), S),
    Row("timm-cait", "CaiT", "timm `cait_xxs24_224`, depth 2", timm_model("cait_xxs24_224", depth=2), S),
    Row("timm-xcit", "XCiT", "timm `xcit_nano_12_p16_224`", timm_model("xcit_nano_12_p16_224"), S),
    Row("timm-pit", "PiT", "timm `pit_ti_224`", timm_model("pit_ti_224"), M),
    Row("timm-twins", "Twins", "timm `twins_svt_small`", timm_model("twins_svt_small"), M),
    Row("timm-crossvit", "CrossViT", "timm `crossvit_tiny_240`", timm_model("crossvit_tiny_240"), (240,)),
    Row("timm-volo", "VOLO", "timm `volo_d1_224`", timm_model("volo_d1_224"), M),
    Row("timm-tnt", "TNT", "timm `tnt_s_patch16_224`", timm_model("tnt_s_patch16_224"), S),
    Row("timm-convit", "ConViT", "timm `convit_tiny`", timm_model("convit_tiny"), S),
    Row("timm-hiera", "Hiera", "timm `hiera_tiny_224`", timm_model("hiera_tiny_224"), M),
    Row("timm-levit", "LeViT", "timm `levit_128s`", timm_model("levit_128s"), (128, 224)),  # 64: last stage 1x1
    Row("timm-efficientformer", "EfficientFormer", "timm `efficientformer_l1`", timm_model("efficientformer_l1"), M),
    Row("timm-mixer", "MLP-Mixer", "timm `mixer_s16_224`", timm_model("mixer_s16_224"), S),
    Row("timm-resmlp", "ResMLP", "timm `resmlp_12_224`", timm_model("resmlp_12_224"), S),
    Row("timm-mambaout", "MambaOut", "timm `mambaout_femto`", timm_model("mambaout_femto", sized=False), S),
    Row("timm-swin", "Swin", "timm `swin_tiny_patch4_window7_224`", timm_model("swin_tiny_patch4_window7_224"), L),
    Row("timm-swinv2", "Swin V2", "timm `swinv2_tiny_window8_256`", timm_model("swinv2_tiny_window8_256"), (256,)),
    Row("timm-tresnet", "TResNet", "timm `tresnet_m`", timm_model("tresnet_m", sized=False), S),
    Row("timm-maxvit", "MaxViT", "timm `maxvit_pico_rw_256`", timm_model("maxvit_pico_rw_256"), (64, 128, 256)),
    Row("timm-davit", "DaViT", "timm `davit_tiny`", timm_model("davit_tiny", sized=False), S),
    Row("timm-coatnet", "CoAtNet", "timm `coatnet_nano_rw_224`", timm_model("coatnet_nano_rw_224"), M),
    Row("timm-naflexvit", "NaFlexViT", "timm `naflexvit_base_patch16_gap`, depth 2",
        timm_model("naflexvit_base_patch16_gap", depth=2), S),
    Row("tv-resnet", "ResNet", "torchvision `resnet18`", tv_model("resnet18"), S),
    Row("tv-convnext", "ConvNeXt", "torchvision `convnext_tiny`", tv_model("convnext_tiny"), S),
    Row("tv-efficientnet", "EfficientNet", "torchvision `efficientnet_b0`", tv_model("efficientnet_b0"), S),
    Row("tv-mobilenet", "MobileNetV3", "torchvision `mobilenet_v3_small`", tv_model("mobilenet_v3_small"), S),
    Row("tv-regnet", "RegNet", "torchvision `regnet_x_400mf`", tv_model("regnet_x_400mf"), S),
    Row("tv-densenet", "DenseNet", "torchvision `densenet121`", tv_model("densenet121"), S),
    Row("tv-vit", "ViT", "torchvision `vit_b_16`", tv_model("vit_b_16", sized=True), S),
    Row("tv-swin", "Swin", "torchvision `swin_t`", tv_model("swin_t"), M),
    Row("tv-swinv2", "Swin V2", "torchvision `swin_v2_t`", tv_model("swin_v2_t"), M),
    Row("tv-maxvit", "MaxViT", "torchvision `maxvit_t`", tv_model("maxvit_t"), (224,)),
    Row("tv-deeplabv3", "DeepLabV3 (segmentation, dict output)", "torchvision `deeplabv3_mobilenet_v3_large`",
        tv_segmentation, S, seg_scores),
    Row("hf-vit", "ViT", "transformers `ViTForImageClassification` (tiny config)", hf_model("vit"), (32, 64)),
    Row("hf-deit", "DeiT (distilled)", "transformers `DeiTForImageClassificationWithTeacher` (tiny config)",
        hf_model("deit"), (32, 64)),
    Row("hf-swin", "Swin", "transformers `SwinForImageClassification` (tiny config)", hf_model("swin"), (32, 64)),
    Row("hf-convnext", "ConvNeXt", "transformers `ConvNextForImageClassification` (tiny config)",
        hf_model("convnext"), (64,)),
    Row("hf-resnet", "ResNet", "transformers `ResNetForImageClassification` (tiny config)", hf_model("resnet"), (64,)),
    Row("hf-dinov2", "DINOv2", "transformers `Dinov2ForImageClassification` (tiny config)", hf_model("dinov2"),
        (32, 64)),
]


def first_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "out" in out:
        return out["out"]
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def fill_zeros(model: nn.Module) -> int:
    """N(0, 0.02) noise in every all-zero parameter (seeded); returns how many there were."""
    g = torch.Generator().manual_seed(1)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
                n += 1
    return n


def one_line(e: BaseException, n: int = 600) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if not isinstance(e, ValueError) else text
    return text if len(text) <= n else text[:n - 3] + "..."


def loop_gradcam(split: funcam.Split, x: Tensor, classes: Any) -> Tensor:
    """The oracle: (B, K, h, w) Grad-CAM from one autograd.grad per class on the split's own feature."""
    feats = split.extract(x)
    a = feats.maps[0] if isinstance(feats, Features) else feats
    out = split.head(feats)
    scores = classes(out) if callable(classes) else first_output(out)[:, classes]
    maps = []
    for k in range(scores.shape[1]):
        (g,) = torch.autograd.grad(scores[:, k].sum(), a, retain_graph=True)
        maps.append(torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), a)))
    return torch.stack(maps, dim=1).detach()


def cut_layout(model: nn.Module, split: funcam.Split, x: Tensor, grid: tuple) -> str:
    """The cut value's layout: for the graph route as funcam's graph probe reads it (a second capture, benchmark
    code only); for timm's routes from the cut value's shape (``forward_features``, or a forward hook on the cut
    module)."""
    gh, gw = grid
    name = split.layers[0] if split.layers else ""
    if split.graph is not None:
        from funcam._src.cuts.auto import probe_input
        from funcam._src.cuts.capture import capture
        from funcam._src.cuts.graph import find, probe

        cap = capture(model, x)
        lay = probe(cap, probe_input(x), model).layouts[find(cap, name, [n for n, _ in model.named_modules() if n])]
        kind = f"tokens {lay.prefix}+{gh}x{gw}" if lay.kind == "tokens" else f"{lay.kind} {gh}x{gw}"
        return f"{kind} (graph)"
    shape = None
    if name == "forward_features":
        with torch.no_grad():
            shape = tuple(model.forward_features(x).shape)
    else:
        mods = dict(model.named_modules())
        if name in mods:
            seen = []
            h = mods[name].register_forward_hook(lambda m, i, o: seen.append(o))
            try:
                with torch.no_grad():
                    model(x)
            finally:
                h.remove()
            if seen and isinstance(seen[-1], Tensor):
                shape = tuple(seen[-1].shape)
    if shape is None:
        kind = f"? (map {gh}x{gw})"
    elif len(shape) == 4 and shape[-2:] == (gh, gw):
        kind = f"NCHW {gh}x{gw}"
    elif len(shape) == 4 and shape[1:3] == (gh, gw):
        kind = f"NHWC {gh}x{gw}"
    elif len(shape) == 3 and shape[1] >= gh * gw:
        kind = f"tokens {shape[1] - gh * gw}+{gh}x{gw}"
    else:
        kind = f"{tuple(shape)} -> {gh}x{gw}"
    return f"{kind} (timm)"


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("time limit")


def run_row(row: Row, limit: int) -> dict:
    res: dict = {"id": row.id, "family": row.family, "library": row.library}
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        _run_row(row, res)
    except Timeout:
        res.setdefault("status", f"not finished in {limit} s")
    except Exception as e:  # noqa: BLE001 - the table reports every failure
        res.setdefault("status", f"error: {one_line(e)}")
    finally:
        signal.alarm(0)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _run_row(row: Row, res: dict) -> None:
    model = size = None
    why = ""
    for s in row.sizes:
        torch.manual_seed(0)
        try:
            m = row.build(s).eval()
            res["filled"] = fill_zeros(m)
            x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = first_output(m(x))
            model, size = m, s
            break
        except Exception as e:  # noqa: BLE001 - too small for this model: the next size
            why = one_line(e)
    if model is None:
        res["status"] = f"model does not run: {why}"
        return
    res["size"] = size
    classes = row.scores or CLASSES
    try:
        split = funcam.split(model, example=x)
    except Exception as e:  # noqa: BLE001
        res["cut"] = "-"
        res["status"] = f"refused: {one_line(e)}"
        return
    res["cut"] = ", ".join(split.layers)
    with torch.no_grad():
        got = first_output(split.head(split.extract(x)))
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    res["head_error"] = err
    out = funcam.cam(split, x, classes)
    maps = out.maps.detach()
    res["layout"] = cut_layout(model, split, x, tuple(maps.shape[-2:]))
    want = loop_gradcam(split, x, classes)
    scale = want.abs().max().item()
    res["gradcam_error"] = (maps - want).abs().max().item() / max(scale, 1e-30)
    res["gradcam_zero"] = not bool(maps.abs().max() > 0)
    res["relevance"] = _relevance(split, x, classes, tuple(maps.shape[-2:]))
    res["guided"] = _guided(model, x, classes)
    res["lrp"] = _lrp(model, x, classes)
    problems = []
    if err > TOL:
        problems.append(f"head(extract(x)) is {err:.1e} off model(x)")
    if res["gradcam_error"] > TOL:
        problems.append(f"Grad-CAM is {res['gradcam_error']:.1e} off the loop")
    if res["gradcam_zero"] or scale == 0:
        problems.append("every map is zero")
    for what in ("relevance", "guided", "lrp"):
        if res[what].startswith("WRONG"):
            problems.append(f"{what} {res[what][7:]}")
    res["status"] = "ok" if not problems else "WRONG: " + "; ".join(problems)


def _refusal(e: BaseException) -> str:
    text = str(e)
    for needle, short in (("has no self-attention", "n/a (no attention found)"),
                          ("needs ReLU activations", "n/a (no ReLU)")):
        if needle in text:
            return short
    return f"refused: {one_line(e)}"


def _relevance(split: funcam.Split, x: Tensor, classes: Any, grid: tuple) -> str:
    """"ok (L attentions)", or what is wrong with the maps, or the refusal. The maps must be on Grad-CAM's grid
    (the last feature's): a rollout over padded windows or several stages would not be."""
    try:
        with torch.no_grad():
            m = funcam.chefer_relevance(split, x, classes)
            n = len(funcam.block_attentions(split, x))
    except Exception as e:  # noqa: BLE001
        return _refusal(e)
    if tuple(m.shape[-2:]) != grid:
        return f"WRONG: {m.shape[-2]}x{m.shape[-1]} map, the last feature is {grid[0]}x{grid[1]} ({n} attentions)"
    return f"ok ({n} attentions)" if bool(m.abs().max() > 0) else "WRONG: zero maps"


LRP_RULES = ("attnlrp", "cplrp", "epsilon_plus")


def _lrp(model: nn.Module, x: Tensor, classes: Any) -> str:
    """``funcam.attnlrp`` / ``cplrp`` / ``lrp`` (the LRP rules on the captured graph; AttnLRP, CP-LRP and zennit's
    EpsilonPlus): "ok" and
    each rule set's conservation error sum |input + bias - start| / sum |start| over the images and classes
    (``lrp_budget``: ``start`` the relevance put at the score, ``bias`` what the model's additive tensors absorb;
    AttnLRP's softmax rule is not conservative, CP-LRP's and z+'s are but for their stabilisers), or the refusal;
    "WRONG" for zero or non-finite maps."""
    errs = []
    try:
        for rule in LRP_RULES:
            with torch.no_grad():
                method, options = as_method(rule)
                m = funcam.cam(model, x, classes, method=method, **options).maps
            if not bool(m.abs().amax(dim=(2, 3)).min() > 0):
                return f"WRONG: zero maps ({rule})"
            if not callable(classes):
                b = lrp_budget(model, x, classes, rule=rule)
                errs.append(float((b.input + b.bias - b.start).abs().sum() / b.start.abs().sum()))
    except Exception as e:  # noqa: BLE001
        return f"refused: {one_line(e)}"
    return "ok" + (" (" + ", ".join(f"{e:.0e}" for e in errs) + ")" if errs else "")


def _guided(model: nn.Module, x: Tensor, classes: Any) -> str:
    """"ok", or the refusal, or "= plain gradient" when the guided rule changed nothing (the ReLUs it saw are not on
    the input's path)."""
    try:
        with torch.no_grad():
            gb = funcam.guided_backprop(model, x, classes)
    except Exception as e:  # noqa: BLE001
        return _refusal(e)
    xx = x.clone().requires_grad_()
    out = model(xx)
    scores = classes(out) if callable(classes) else first_output(out)[:, classes]
    (g,) = torch.autograd.grad(scores[:, 0].sum(), xx)
    if not bool(gb.abs().max() > 0):
        return "WRONG: zero maps"
    if (gb[:, 0] - g).abs().max() <= 1e-5 * g.abs().max():
        return "WRONG: = plain gradient (no ReLU on the input's path)"
    return "ok"


LEGEND = """\
* default cut: `funcam.split(model)` with no `layer=`. Layout: the cut value's axes, NCHW, NHWC, or `tokens p+hxw`
  (p prefix tokens - CLS, distillation, registers - then an h x w grid); (timm): timm's `forward_features` or token
  route, (graph): the captured-graph route (`funcam.cuts`).
* Grad-CAM vs oracle: max |funcam - loop| / max |loop| for K=3 classes, the loop being one `torch.autograd.grad`
  per class on the same split; `head(extract(x)) == model(x)` and maps not all zero are checked too (status).
* relevance: `funcam.chefer_relevance`, "ok (N attentions)" with the number of attention layers rolled out; its map
  must be on Grad-CAM's grid. Window attention, pooling stages and several branches are refused (rollout multiplies
  attention matrices over one token sequence).
* guided: `funcam.guided_backprop`; "= plain gradient" when the guided rule changed nothing (the ReLUs funcam saw
  are not on the input's path).
* LRP: `funcam.lrp` (LRP rules on the captured graph) with rule sets attnlrp, cplrp and epsilon_plus, maps (B, K, H, W)
  not all zero; in brackets each rule set's conservation error sum |input + bias - start| / sum |start| over images
  and classes (start: the relevance put at the score, its value or 1; bias: what biases, batch-norm means, position
  embeddings and class tokens absorb). AttnLRP's softmax rule is not conservative by design; CP-LRP and z+ are up to
  their stabilisers (and gates held constant).
"""


def short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def markdown(rows: list[dict]) -> str:
    lines = ["| family | library | default cut (`split.layers`) | layout | Grad-CAM vs oracle (max error) | relevance "
             "| guided | LRP (conservation error: attnlrp, cplrp, epsilon_plus) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f" @ {r['size']}px" if r.get("size") else ""
        ge = f"{r['gradcam_error']:.1e}" if "gradcam_error" in r else "-"
        cut = f"`{r['cut']}`" if r.get("cut") not in (None, "-", "") else "-"
        cells = [r["family"], r["library"] + size, cut, r.get("layout", "-"), ge, short(r.get("relevance", "-")),
                 short(r.get("guided", "-")), short(r.get("lrp", "-")), short(r["status"], 200)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated substrings of row ids (e.g. 'timm-vit,hf-')")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=600, help="seconds per model before it is reported unfinished")
    p.add_argument("--json", default=os.path.join(HERE, "supported_models.json"))
    p.add_argument("--markdown", default=os.path.join(HERE, "supported_models.md"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    only = [s for s in a.only.split(",") if s]
    todo = [r for r in ROWS if not only or any(s in r.id for s in only)]
    done: dict = {}
    if os.path.exists(a.json):
        with open(a.json) as f:
            done = {r["id"]: r for r in json.load(f)["rows"]}
    for row in todo:
        res = run_row(row, a.limit)
        done[row.id] = res
        print(f"{row.id:22s} {res['seconds']:6.1f} s  {res.get('cut', '-')!s:40s} {res['status']}", flush=True)
        with open(a.json, "w") as f:  # after every model: a later crash keeps what was measured
            json.dump({"meta": meta(a.threads), "rows": [done[r.id] for r in ROWS if r.id in done]}, f, indent=1)
    rows = [done[r.id] for r in ROWS if r.id in done]
    ok = sum(r["status"] == "ok" for r in rows)
    m = meta(a.threads)
    refused = sum(r["status"].startswith(("refused", "model does not run")) for r in rows)
    wrong = sum(r["status"].startswith("WRONG") for r in rows)
    text = (f"{markdown(rows)}\n\n{ok} of {len(rows)} ok, {refused} refused, {wrong} with a wrong result "
            f"(`python benchmarks/supported_models.py`). Random weights (all-zero parameters filled with N(0, 0.02)), "
            f"B=2, K=3, float32, at the input size shown; torch {m['torch']}, timm {m['timm']}, torchvision "
            f"{m['torchvision']}, transformers {m['transformers']}.\n\n{LEGEND}")
    with open(a.markdown, "w") as f:
        f.write(text)
    print(text)


def meta(threads: int) -> dict:
    import timm
    import torchvision
    import transformers

    return {"torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "threads": threads}


if __name__ == "__main__":
    main()
