"""funcam's LRP for K classes in one call beside its limit and its peers, in one process and one run.

    python benchmarks/lrp_speed.py                          # ViT-S/16 (torchvision) and ResNet-50, B=2, K=100
    python benchmarks/lrp_speed.py --models tv-vit-s --k 100 --batch 1 --size 224 --threads 2

Per model and rule set:
- ``funcam``: ``funcam._src.core.lrp.lrp(model, x, classes=range(K), rule=...)``, one forward and one vjp vmapped over
  the K classes in chunks bounded by ``max_memory`` (default 128 MiB); the graph captured before timing.
- ``model x K`` (the limit, as ``benchmarks/peers.py``): one plain forward, then K plain backward passes of the model
  to the input (``autograd.grad`` with the graph kept), timed over ``--peer-classes`` classes and extrapolated.
- the peer one target at a time, as its examples do it (a forward and a backward per target), timed over
  ``--peer-classes`` targets and extrapolated: lxt 2.1 (efficient mode) for AttnLRP / CP-LRP on torchvision's
  ViT, zennit 0.5 (``Gradient`` attributor with the composite and its ResNet canonizer) on ResNet-50.
Times: median of ``benchmarks.peers.measure`` (after a warm-up call); peak memory: resident set size above the
start during one call. The ratios (funcam / limit, peer / funcam) come from the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from functools import partial

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.peers import measure, model_limit  # noqa: E402
from funcam._src.core.engine import DEFAULT_MAX_MEMORY  # noqa: E402
from funcam._src.core.lrp import LRP_BYTES_PER_WIDEST, graph_for, rule_set  # noqa: E402
from tests._oracle import lxt_efficient, patched  # noqa: E402
from tests.conftest import lrp  # noqa: E402


def build(name: str, size: int) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    if name == "tv-vit-s":  # ViT-S/16 in torchvision's class (the one lxt patches)
        m = torchvision.models.VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=6,
                                                 hidden_dim=384, mlp_dim=1536, num_classes=1000)
        with torch.no_grad():
            m.heads.head.weight.normal_(0, 0.02)  # zero-initialised
    elif name == "tv-resnet50":
        m = torchvision.models.resnet50(weights=None)
    else:
        raise ValueError(name)
    return m.eval()


@contextlib.contextmanager
def lxt_patched(rule: str):
    """lxt 2.1's patches for torchvision's ViT (its ``cp_LRP`` map; for AttnLRP its attention rule at
    ``nn.MultiheadAttention``), loaded without lxt.efficient's package __init__ (broken on transformers 5), undone
    afterwards."""
    with lxt_efficient():
        from lxt.efficient.models.vit_torch import cp_LRP
        from lxt.efficient.patches import patch_method
        from lxt.efficient.rules import divide_gradient

        def attn_forward(self, query, key, value, *args, **kwargs):
            return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4),
                                         divide_gradient(value, 2), *args, **kwargs)

        pm = dict(cp_LRP)
        if rule == "attnlrp":
            pm[nn.MultiheadAttention] = partial(patch_method, attn_forward, keep_original=True)
        with patched(pm):
            yield


def lxt_one_at_a_time(model: nn.Module, x: torch.Tensor, n: int):
    """lxt's recipe per target: forward, ``y[:, c].backward()``, ``x * x.grad`` summed over colours."""
    def run():
        maps = []
        for c in range(n):
            xx = x.clone().requires_grad_()
            model(xx)[:, c].sum().backward()
            maps.append((xx * xx.grad).sum(1))
        return maps
    return run


def zennit_one_at_a_time(model: nn.Module, x: torch.Tensor, n: int):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import ResNetCanonizer

    def run():
        maps = []
        with warnings.catch_warnings(), Gradient(model, EpsilonPlus(canonizers=[ResNetCanonizer()])) as attributor:
            warnings.simplefilter("ignore")
            for c in range(n):
                one_hot = torch.zeros(x.shape[0], 1000).index_fill_(1, torch.tensor([c]), 1.0)
                maps.append(attributor(x, one_hot)[1].sum(1))
        return maps
    return run


def run(name: str, rules: list[str], a) -> list[dict]:
    model = build(name, a.size)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    k, n = a.k, a.peer_classes
    classes = list(range(k))
    with torch.no_grad():
        fwd = measure(lambda: model(x), min_time=a.min_time)
    setup, limit_n = model_limit(model, x, n)
    s0, sn = measure(setup, min_time=a.min_time), measure(limit_n, min_time=a.min_time, min_repeats=1)
    limit_s = s0["median_s"] + (sn["median_s"] - s0["median_s"]) * k / n
    rows = []
    for rule in rules:
        graph_for(model, x, rule_set(rule))  # the capture, once per input size: not part of the timed calls
        lg = graph_for(model, x, rule_set(rule))
        per_class = LRP_BYTES_PER_WIDEST * lg.widest * x.shape[0] + 4 * x.numel() * x.element_size()
        ours = measure(lambda r=rule: lrp(model, x, classes, rule=r), min_time=a.min_time, min_repeats=1)
        if name == "tv-vit-s":
            with lxt_patched(rule):
                peer = measure(lxt_one_at_a_time(model, x, n), min_time=a.min_time, min_repeats=1)
            who = "lxt 2.1"
        elif rule == "epsilon_plus":
            peer = measure(zennit_one_at_a_time(model, x, n), min_time=a.min_time, min_repeats=1)
            who = "zennit 0.5"
        else:
            peer, who = None, "-"
        peer_s = None if peer is None else peer["median_s"] * k / n
        rows.append({"model": name, "rule": rule, "batch": a.batch, "size": a.size, "k": k,
                     "forward_s": fwd["median_s"],
                     "limit_s": limit_s, "funcam_s": ours["median_s"], "x_limit": ours["median_s"] / limit_s,
                     "peer": who, "peer_s": peer_s, "peer_x": None if peer_s is None else peer_s / ours["median_s"],
                     "funcam_peak_mb": ours["peak_mb"], "limit_peak_mb": sn["peak_mb"],
                     "peer_peak_mb": None if peer is None else peer["peak_mb"],
                     "chunk": max(1, DEFAULT_MAX_MEMORY // per_class), "per_class_mb": per_class / 2**20})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | rule | B x K | forward | model x K limit | funcam | funcam / limit | peer, one target at a "
             "time | peer / funcam | peak MB funcam / limit / peer | chunk (classes) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = "-" if r["peer_s"] is None else f"{r['peer']}: {r['peer_s']:.1f} s"
        px = "-" if r["peer_x"] is None else f"{r['peer_x']:.1f}x"
        pp = "-" if r["peer_peak_mb"] is None else f"{r['peer_peak_mb']:.0f}"
        lines.append(f"| {r['model']} @ {r['size']} | {r['rule']} | {r['batch']} x {r['k']} | {r['forward_s']:.2f} s "
                     f"| {r['limit_s']:.1f} s | {r['funcam_s']:.1f} s | {r['x_limit']:.2f}x | {peer} | {px} | "
                     f"{r['funcam_peak_mb']:.0f} / {r['limit_peak_mb']:.0f} / {pp} | {r['chunk']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tv-vit-s,tv-resnet50")
    p.add_argument("--rules", default="", help="comma-separated; default attnlrp,cplrp for ViTs, epsilon_plus,attnlrp "
                                               "for CNNs")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--peer-classes", type=int, default=10)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models.split(","):
        rules = a.rules.split(",") if a.rules else (["attnlrp", "cplrp"] if "vit" in name else
                                                    ["epsilon_plus", "attnlrp"])
        rows += run(name, rules, a)
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
