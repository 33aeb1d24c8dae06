"""funcam.targets beyond classification, in one run: K CLIP prompts, N detection boxes (random weights, CPU).

    python benchmarks/targets.py                   # CLIP RN50 / ViT-B/32 at K = 1000, Faster R-CNN R50-FPN at N = 20
    python benchmarks/targets.py --quick           # a smoke run on tiny configurations

Prompts: Grad-CAM of K text prompts (``funcam.targets.prompts``, random (K, D) embeddings) on open_clip image towers
(``pretrained=None``), funcam's CLIP split (``funcam._src.cuts.clip``) against one forward of the tower; beside it the
per-prompt loop a peer pays (pytorch-grad-cam: one forward and backward per prompt on a tower whose output is the K
similarities; timed over ``--peer-prompts`` prompts and scaled to K) and the graph route (``funcam.split`` of the
tower) at the same K.
Boxes: Grad-CAM of N reference boxes (``funcam.targets.boxes``, N of the model's own detections) on torchvision's
``fasterrcnn_resnet50_fpn`` (``weights=None``, every detection kept), funcam's detection split against
pytorch-grad-cam's per-box loop (``FasterRCNNBoxScoreTarget`` of one box per call; target layer C5, the last stage
under the FPN: its hooks cannot take the FPN's dict of levels) and against the limit: one forward with its graph
kept plus N backward passes of the detection head (each box's score to the FPN levels, through the model's RoI
heads).
Times: median of ``--repeats`` calls after a warm-up, each model's forward timed before and after its rows (the
mean is the unit). Output: Markdown tables on stdout, JSON with the machine's metadata (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``funcam`` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import funcam  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402
from funcam._src.cuts import clip, detection  # noqa: E402

CLOCK = time.perf_counter  # --clock process: time.process_time, this process's CPU time (a machine shared with
# other jobs stretches wall times by whatever else runs; with one thread, CPU time counts only this work)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up, never timed
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


class Similarities(nn.Module):
    """A CLIP tower whose output is the K scaled cosine similarities (B, K): the model a peer is given."""

    def __init__(self, tower: nn.Module, text: torch.Tensor, scale: float):
        super().__init__()
        self.tower, self.score = tower, funcam.targets.prompts(text, logit_scale=scale)

    def forward(self, x):
        return self.score(self.tower(x))


def pgc_prompt_loop(tower, layer, reshape, x, text, scale, n: int):
    """pytorch-grad-cam's GradCAM, one call per prompt (n prompts), on the similarities model."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=Similarities(tower, text, scale), target_layers=[layer], reshape_transform=reshape) as cam:
        for k in range(n):
            cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * x.shape[0])


def vit_reshape(grid: int):
    def reshape(t):  # (B, 1 + h w, C) tokens -> (B, C, h, w), pytorch-grad-cam's ViT recipe
        return t[:, 1:].reshape(t.shape[0], grid, grid, t.shape[-1]).permute(0, 3, 1, 2)
    return reshape


def prompts_rows(name: str, batch: int, k: int, repeats: int, peer_prompts: int, quick: bool) -> list[dict]:
    import open_clip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quick:
            vision = (dict(layers=(1, 1, 1, 1), width=16, image_size=64, head_width=16) if name == "RN50" else
                      dict(layers=2, width=32, patch_size=16, image_size=64, head_width=16))
            model = open_clip.CLIP(32, vision, dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
        else:
            model = open_clip.create_model(name, pretrained=None)
    tower = model.visual.eval()
    size = clip.image_size(tower)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    text = torch.randn(k, tower.output_dim, generator=torch.Generator().manual_seed(2))
    score = funcam.targets.prompts(text, logit_scale=100.0)
    sp = clip.split(tower)
    graph = funcam.split(tower, example=x)
    rows = []
    with torch.no_grad():
        fwd0 = median_time(lambda: tower(x), repeats)
        rows.append(("funcam (clip split)", median_time(lambda: funcam.cam(sp, x, classes=score), repeats), k))
        rows.append(("funcam (graph route)", median_time(lambda: funcam.cam(graph, x, classes=score), 1), k))
    if name == "RN50":
        layer, reshape = tower.layer4, None
    else:
        layer, reshape = tower.transformer.resblocks[-1].ln_1, vit_reshape(size[0] // tower.patch_size[0])
    n = min(peer_prompts, k)
    t = median_time(lambda: pgc_prompt_loop(tower, layer, reshape, x, text, 100.0, n), 1)
    rows.append(("pytorch-grad-cam, one call per prompt", t * k / n, n))
    with torch.no_grad():
        fwd = (fwd0 + median_time(lambda: tower(x), repeats)) / 2
    return [{"model": f"open_clip {name}", "batch": batch, "size": size, "K": k, "who": who, "median_s": s,
             "timed_over": timed, "x_forward": s / fwd, "forward_s": fwd} for who, s, timed in rows]


def boxes_rows(batch: int, n: int, repeats: int, min_size: int, quick: bool) -> list[dict]:
    from torchvision.models import detection as D

    torch.manual_seed(0)
    if quick:
        model = D.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                    box_score_thresh=0.0, min_size=min_size, max_size=min_size)
    else:
        model = D.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0,
                                          min_size=min_size, max_size=min_size)
    model.eval()
    x = torch.rand(batch, 3, min_size, min_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dets = model(list(x))
    m = min(len(d["boxes"]) for d in dets)
    pick = torch.linspace(0, m - 1, n).round().long()  # N of each image's own detections, spread over the ranks
    ref = torch.stack([d["boxes"][pick] for d in dets])
    labels = torch.stack([d["labels"][pick] for d in dets])
    score = funcam.targets.boxes(ref, labels)
    sp = detection.split(model)
    names = [s.split(":", 1)[1] for s in sp.layers]
    rows = []
    with torch.no_grad():
        fwd0 = median_time(lambda: model(list(x)), repeats)
        rows.append(("funcam (detection split)", median_time(lambda: funcam.cam(sp, x, classes=score), repeats), n))
    rows.append(("limit: one forward + N head backward passes", limit(model, x, names, ref, labels, repeats), n))
    t = median_time(lambda: pgc_box_loop(model, x, ref, labels, n), 1)
    rows.append(("pytorch-grad-cam, one call per box", t, n))
    with torch.no_grad():
        fwd = (fwd0 + median_time(lambda: model(list(x)), repeats)) / 2
    name = "mobilenet_v3 Faster R-CNN" if quick else "fasterrcnn_resnet50_fpn"
    return [{"model": name, "batch": batch, "size": (min_size, min_size), "K": n, "who": who, "median_s": s,
             "timed_over": timed, "x_forward": s / fwd, "forward_s": fwd} for who, s, timed in rows]


def limit(model, x, names, ref, labels, repeats: int) -> float:
    """One forward of the model with the FPN levels as leaves (a forward hook swaps them in), then one
    ``autograd.grad`` of each box's score to the levels, the graph kept: what a peer reusing one forward pays."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    def run():
        leaves = []

        def swap(mod, inp, out):
            new = type(out)((k, v.detach().requires_grad_()) for k, v in out.items())
            leaves.extend(new[k] for k in names)
            return new

        h = model.backbone.register_forward_hook(swap)
        try:
            dets = model(list(x))
        finally:
            h.remove()
        for i in range(ref.shape[1]):
            s = sum(FasterRCNNBoxScoreTarget([int(labels[b, i])], ref[b, i:i + 1].numpy())(d)[0]
                    for b, d in enumerate(dets))
            torch.autograd.grad(s, leaves, retain_graph=True, allow_unused=True)

    return median_time(run, repeats)


def pgc_box_loop(model, x, ref, labels, n: int) -> None:
    """pytorch-grad-cam's GradCAM with FasterRCNNBoxScoreTarget, one box per call. Its gradient hooks need a tensor
    output, so the target layer is the body's last stage (C5, under the FPN; its tutorial's FPN-dict target layer
    serves gradient-free EigenCAM only): one forward and one backward to C5 per box."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    layer = list(model.backbone.body.children())[-1]
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for i in range(n):
            targets = [FasterRCNNBoxScoreTarget([int(labels[b, i])], ref[b, i:i + 1].numpy())
                       for b in range(x.shape[0])]
            cam(input_tensor=x, targets=targets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny configurations (a smoke run)")
    p.add_argument("--batch", type=int, default=4, help="images for the prompt rows")
    p.add_argument("--k", type=int, default=1000, help="prompts")
    p.add_argument("--peer-prompts", type=int, default=10, help="prompts the per-prompt loop is timed over")
    p.add_argument("--boxes", type=int, default=20, help="reference boxes per image")
    p.add_argument("--det-batch", type=int, default=1, help="images for the box rows")
    p.add_argument("--det-size", type=int, default=512, help="Faster R-CNN's min_size = max_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="wall time, or this process's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--json", default="benchmarks/targets.json")
    a = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "process" else time.perf_counter
    torch.set_num_threads(a.threads)
    if a.quick:
        a.batch, a.k, a.peer_prompts, a.boxes, a.det_size, a.repeats = 2, 100, 3, 4, 128, 1
    warnings.filterwarnings("ignore")
    rows = []
    for name in ("RN50", "ViT-B-32"):
        rows += prompts_rows(name, a.batch, a.k, a.repeats, a.peer_prompts, a.quick)
    rows += boxes_rows(a.det_batch, a.boxes, a.repeats, a.det_size, a.quick)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name(), "device": "cpu",
            "quick": a.quick, "clock": a.clock}
    print(f"\n{meta['cpu']}, {meta['threads']} threads, torch {torch.__version__}, {a.clock} time\n")
    print("| model (one forward) | B | K / N | who | time (s) | x forward |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        note = "" if r["timed_over"] == r["K"] else f" (timed over {r['timed_over']}, scaled)"
        print(f"| {r['model']} ({r['forward_s']:.2f} s) | {r['batch']} | {r['K']} | {r['who']}{note} | "
              f"{r['median_s']:.2f} | {r['x_forward']:.2f} |")
    by = {(r["model"], r["who"]): r for r in rows}
    det = rows[-1]["model"]
    ours, peer = by[(det, "funcam (detection split)")], by[(det, "pytorch-grad-cam, one call per box")]
    lim = by[(det, "limit: one forward + N head backward passes")]
    print(f"\nboxes: funcam {peer['median_s'] / ours['median_s']:.1f}x faster than pytorch-grad-cam's per-box loop; "
          f"{ours['median_s'] / lim['median_s']:.2f}x the limit")
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
