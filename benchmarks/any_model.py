"""Models without timm's split, on the graph route: funcam next to the autograd loop and pytorch-grad-cam.

    python benchmarks/any_model.py                  # torchvision vit_b_16 and a Hugging Face ViT-Base, K = 1, 100
    python benchmarks/any_model.py --quick          # a smoke run on tiny configurations

Each model is split by ``funcam.split(model, example=x)`` with no layer name (its graph captured once, before the
timings; the capture time is reported apart), and explained with Grad-CAM at the default cut (the token feature
before the last attention, ``ln_1`` / ``layernorm_before`` of the last layer). Contenders on the same cut:
the textbook autograd loop (one forward of ``extract`` and one ``autograd.grad`` of the head per class) and
pytorch-grad-cam with the token-to-grid ``reshape_transform`` its users write by hand. Peers cost the same per
class, so they are timed over ``--peer-classes`` classes and scaled to K. Times and peaks as in
``benchmarks/peers.py`` (``measure``: median of ``blocked_autorange`` after a warm-up; peak RSS of one call).
Output: a Markdown table on stdout, JSON with the machine's metadata (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``funcam`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import funcam  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402
from benchmarks.peers import measure, settle  # noqa: E402
from funcam._src.base import as_features  # noqa: E402
from funcam._src.core import rules  # noqa: E402


class Logits(nn.Module):
    """A Hugging Face classifier as ``x -> logits``, for peers that index the output (pytorch-grad-cam)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def fill_zeros(model: nn.Module) -> nn.Module:
    """Random weights as a trained model would have them: libraries zero-initialise some tensors (torchvision's ViT
    head, class token), and with those the gradient is exactly zero and funcam refuses to make a map."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def build(name: str, size: int, quick: bool):
    """(model, pytorch-grad-cam's target layer and reshape, prefix tokens) for a model name."""
    torch.manual_seed(0)
    if name == "torchvision_vit_b_16":
        import torchvision

        kw = dict(image_size=size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64) if quick else {}
        model = (torchvision.models.VisionTransformer(**kw) if quick else torchvision.models.vit_b_16()).eval()
        return fill_zeros(model), model.encoder.layers[-1].ln_1, 1
    if name == "hf_vit_base":
        import transformers

        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if quick else {}
        cfg = transformers.ViTConfig(image_size=size, num_labels=1000, **kw)
        model = transformers.ViTForImageClassification(cfg).eval()
        return fill_zeros(model), model.vit.layers[-1].layernorm_before, 1
    raise ValueError(f"unknown model {name!r}")


def loop(sp: funcam.Split, x, classes):
    """One forward of ``extract`` and one ``autograd.grad`` of the head's logit per class, Grad-CAM by hand."""
    def run():
        out = []
        for k in classes.tolist():
            feats, rebuild = as_features(sp.extract(x))
            a = feats.maps[0].detach().requires_grad_()
            logits = sp.head(rebuild((a,) + tuple(feats.maps[1:])))
            logits = getattr(logits, "logits", logits)  # a Hugging Face ModelOutput
            (g,) = torch.autograd.grad(logits[:, k].sum(), a)
            out.append(torch.relu(rules.gradcam(g, a.detach())))
        return torch.stack(out, 1)
    return run


def pgc(model: nn.Module, layer: nn.Module, prefix: int, grid: tuple[int, int], x, classes):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def reshape(t):  # (B, prefix + h w, C) -> (B, C, h, w): what pytorch-grad-cam's users write for ViTs
        return t[:, prefix:].reshape(t.shape[0], grid[0], grid[1], t.shape[-1]).permute(0, 3, 1, 2)

    net = Logits(model) if hasattr(model, "config") else model
    cam = GradCAM(net, target_layers=[layer], reshape_transform=reshape)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * x.shape[0]) for k in classes.tolist()]
    return run, cam.activations_and_grads.release


def run_model(name: str, a) -> list[dict]:
    model, layer, prefix = build(name, a.size, a.quick)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    sp = funcam.split(model, example=x)
    capture_s = time.perf_counter() - t0
    grid = (a.size // 16, a.size // 16)
    forward = (lambda: model(pixel_values=x)) if hasattr(model, "config") else (lambda: model(x))
    settle(Logits(model) if hasattr(model, "config") else model, x)
    rows = []

    def add(k, who, res, scaled_from=None):
        res = dict(res, model=name, batch=a.batch, K=k, who=who, layer=sp.layers[0], note="")
        if scaled_from is not None and scaled_from != k:
            res["median_s"] *= k / scaled_from
            res["note"] = f"timed over {scaled_from} classes, scaled"
        rows.append(res)
        print(f"  {name} K={k} {who}: {res['median_s']:.3f} s {res['note']}", file=sys.stderr, flush=True)

    with torch.no_grad():
        add(0, "model forward", measure(forward, min_time=a.min_time))
    for k in a.ks:
        classes = torch.arange(k)
        with torch.no_grad():
            add(k, "funcam", measure(lambda classes=classes: funcam.gradcam(sp, x, classes), min_time=a.min_time,
                                     min_repeats=1 if k > 1 else 3))
        few = classes[: min(k, a.peer_classes)]
        add(k, "autograd loop", measure(loop(sp, x, few), min_time=a.min_time, min_repeats=1),
            scaled_from=len(few))
        run, release = pgc(model, layer, prefix, grid, x, few)
        try:
            add(k, "pytorch-grad-cam", measure(run, min_time=a.min_time, min_repeats=1), scaled_from=len(few))
        finally:
            release()
    fwd = rows[0]["median_s"]
    for r in rows:
        r["x_forward"] = r["median_s"] / fwd
        r["capture_s"] = capture_s
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| model (default cut) | K | funcam (s) | x forward | autograd loop | pytorch-grad-cam |",
           "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == name]
        fwd = sub[0]
        for k in sorted({r["K"] for r in sub if r["K"]}):
            f = next(r for r in sub if r["K"] == k and r["who"] == "funcam")
            cells = []
            for who in ("autograd loop", "pytorch-grad-cam"):
                p = next(r for r in sub if r["K"] == k and r["who"] == who)
                cells.append(f"{p['median_s']:.1f} ({p['median_s'] / f['median_s']:.1f}x)")
            what = f"{name} (`{f['layer']}`; forward {fwd['median_s']:.2f} s, capture {f['capture_s']:.1f} s)"
            out.append(f"| {what} | {k} | "
                       f"{f['median_s']:.2f} | {f['x_forward']:.2f} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="torchvision_vit_b_16,hf_vit_base")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ks", default="1,100")
    p.add_argument("--peer-classes", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="tiny configurations at 32 px, B=2, K=1,3")
    p.add_argument("--json", default="benchmarks/any_model.json")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.size, a.ks, a.peer_classes, a.min_time = 2, 32, "1,3", 2, 0.05
    a.ks = [int(k) for k in a.ks.split(",")]
    rows = []
    for name in a.models.split(","):
        rows += run_model(name, a)
    print(markdown(rows))
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "batch": a.batch, "size": a.size}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
