"""Every funcam method scored by Quantus-style metrics on EfficientNet-Lite0's real ImageNet weights and the bundled
photos, with model-free baselines (random, centre, Sobel edges) as rows beside them and the randomisation sanity
checks (random logit, MPRT) that separate a map that reads the model from one that does not.

    python benchmarks/quality_metrics.py [--quick] [--threads 1]   # or: python -m benchmarks.quality_metrics

Methods come from the method table (``funcam.explain.METHOD_NAMES``, ``funcam.explain.explain``); a method that
refuses the model (attention methods on a CNN) is skipped with its reason. Each photo is explained for its top-1
class; every score is the mean over the photos. Map metrics score each method's maps and the three baselines in
one call (``funcam.metrics.with_baselines``); metrics that recompute explanations (average sensitivity, random
logit, MPRT, efficient MPRT) use the method's own explainer, and the baseline's for a baseline row. Prints
Markdown, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._machine import cpu_name  # noqa: E402
from funcam import metrics  # noqa: E402
from funcam._src.app.images import sample_images  # noqa: E402
from funcam._src.app.models import preprocess  # noqa: E402
from funcam._src.core.evaluation import attributions  # noqa: E402
from funcam._src.core.postprocess import upsample  # noqa: E402
from funcam.explain import METHOD_NAMES, explain  # noqa: E402
from funcam.models import load_model  # noqa: E402

BASELINE_ROWS = ("random (7x7)", "centre", "sobel")


def map_metrics(quick: bool) -> dict:
    """column -> (metric, options, summary of its (B, K[, T]) result, better: 'higher' / 'lower')."""
    auc_mean = lambda t: t.mean(dim=-1)  # noqa: E731 - a curve's mean: its area over steps, comparable across runs
    cols = {
        "pixel flipping (mean score)": (metrics.pixel_flipping, {"features_in_step": 224 * (56 if quick else 28)},
                                        auc_mean, "lower"),
        "region perturbation MoRF (mean drop)": (metrics.region_perturbation, {"patch_size": 28,
                                                 "regions_evaluation": 8 if quick else 16}, auc_mean, "higher"),
        "faithfulness estimate": (metrics.faithfulness_estimate, {"features_in_step": 224 * (56 if quick else 28)},
                                  None, "higher"),
        "faithfulness correlation": (metrics.faithfulness_correlation, {"nr_runs": 8 if quick else 24,
                                     "subset_size": 224 * 64, "generator": torch.Generator().manual_seed(0)}, None,
                                     "higher"),
        "infidelity": (metrics.infidelity, {"perturb_patch_sizes": [56], "n_perturb_samples": 1}, None, "lower"),
        "sparseness": (metrics.sparseness, {}, None, "higher"),
        "complexity": (metrics.complexity, {}, None, "lower"),
    }
    if not quick:
        cols["IROF"] = (metrics.irof, {}, None, "higher")
    return cols


def explainer_of(name: str):
    return lambda model, x, classes: explain(model, x, method=name, classes=classes).maps


def baseline_explainers() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"random (7x7)": lambda model, x, classes: metrics.random_maps(model, x, classes, generator=g),
            "centre": metrics.centre_maps, "sobel": metrics.sobel_maps}


def recompute_metrics(quick: bool) -> dict:
    """column -> (metric, options, better): metrics whose explanations are recomputed by the row's explainer."""
    return {
        "avg sensitivity": (metrics.avg_sensitivity, {"nr_samples": 2 if quick else 4, "lower_bound": 0.05,
                                                      "generator": torch.Generator().manual_seed(0)}, "lower"),
        "random logit (SSIM)": (metrics.random_logit, {"generator": torch.Generator().manual_seed(0)}, "lower"),
        "MPRT, all layers reset (Spearman)": (metrics.mprt, {"skip_layers": True, "return_last_correlation": True},
                                              "lower"),
        "efficient MPRT": (metrics.efficient_mprt, {}, "higher"),
    }


def _mean(t: torch.Tensor) -> float:
    return float(t.double().nanmean())


def run(*, quick: bool = False, methods=None) -> dict:
    model, cfg = load_model("efficientnet_lite0")
    photos = sample_images()
    names = sorted(photos)[:2] if quick else sorted(photos)
    x = preprocess([photos[k] for k in names], cfg)
    with torch.no_grad():
        classes = model(x).argmax(dim=1, keepdim=True)
    methods = (("gradcam", "rollout") if quick else METHOD_NAMES) if methods is None else methods
    rows: dict[str, dict] = {}  # method or baseline -> column -> mean over the photos
    skipped: dict[str, str] = {}
    explainers = {}
    for name in methods:
        try:
            maps = upsample(explain(model, x, method=name, classes=classes).maps, x.shape[-2:])
        except (ValueError, TypeError) as e:  # the method refuses this model (attention methods on a CNN)
            skipped[name] = str(e).split("\n")[0][:160]
            continue
        explainers[name] = explainer_of(name)
        rows[name] = {}
        t0 = time.perf_counter()
        first = BASELINE_ROWS[0] not in rows  # the first method's calls score the baselines too
        for col, (fn, options, summary, _) in map_metrics(quick).items():
            if not first:
                out = {"maps": fn(model, x, maps, classes, **options)}
            else:  # the same call, the baselines appended as classes
                out = metrics.with_baselines(fn, model, x, maps, classes,
                                             baseline_generator=torch.Generator().manual_seed(1), **options)
            for who, key in zip(("maps", "random", "centre", "sobel"), (name,) + BASELINE_ROWS):
                if who in out:
                    rows.setdefault(key, {})[col] = _mean(summary(out[who]) if summary else out[who])
        rows[name]["seconds (map metrics)"] = time.perf_counter() - t0
        print(f"{name}: map metrics in {rows[name]['seconds (map metrics)']:.0f} s", file=sys.stderr)
    explainers.update(baseline_explainers())
    for name, fn in explainers.items():
        t0 = time.perf_counter()
        maps = fn(model, x, classes)
        for col, (metric, options, _) in recompute_metrics(quick).items():
            rows[name][col] = _mean(metric(model, x, maps, classes, explain_fn=fn, **options))
        rows[name]["seconds (recomputing metrics)"] = time.perf_counter() - t0
        print(f"{name}: recomputing metrics in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"rows": rows, "skipped": skipped, "photos": names, "classes": classes[:, 0].tolist(),
            "sanity": sanity(model, x, classes, explainers, quick)}


def sanity(model, x, classes, explainers: dict, quick: bool) -> dict:
    """The cascading MPRT (top layer first; Spearman of the absolute maps, as ``funcam.metrics.mprt``) after
    resetting the top d layers, for Grad-CAM and the Sobel map, and the Pearson correlation of the randomised
    models' outputs with the model's (all cascade states run by ``randomised_outputs``: stacked, vmapped)."""
    t0 = time.perf_counter()
    layers, outs = metrics.randomised_outputs(model, x)
    vmap_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(x)
    states = [s for _, s in metrics.randomised_states(model)]
    depths = [d for d in ((1, 2) if quick else (1, 2, 5, 10, 20, 50, len(layers))) if d <= len(layers)]
    result = {"layers": len(layers), "depths": depths, "randomised_outputs_seconds": vmap_s,
              "output_pearson": [_mean(metrics.pearson(ref, outs[d - 1])) for d in depths], "mprt": {}}
    for name in ("gradcam", "sobel"):
        if name in explainers:
            fn = explainers[name]
            base = attributions(fn(model, x, classes), x, abs=True, normalise=True).flatten(2)
            result["mprt"][name] = [_mean(metrics.spearman(base, attributions(
                metrics.call_with(model, states[d - 1], fn, x, classes), x, abs=True, normalise=True).flatten(2)))
                for d in depths]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 photos, 3 methods, fewer steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_metrics.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = run(quick=a.quick)
    res.update({"threads": a.threads, "torch": torch.__version__, "cpu": cpu_name(), "quick": a.quick,
                "seconds": time.perf_counter() - t0})
    cols = [(c, b) for c, (*_, b) in map_metrics(a.quick).items()] + \
        [(c, b) for c, (*_, b) in recompute_metrics(a.quick).items()]
    print(f"\n### Quantus-style metrics, EfficientNet-Lite0, {len(res['photos'])} photos, top-1 class "
          f"({a.threads} thread(s), {cpu_name()})\n")
    print("| method | " + " | ".join(f"{c} ({'higher' if b == 'higher' else 'lower'} better)" for c, b in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in res["rows"].items():
        cells = [f"{r[c]:.3g}" if c in r and not math.isnan(r[c]) else "-" for c, _ in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, why in res["skipped"].items():
        print(f"\n{name}: skipped ({why})")
    s = res["sanity"]
    print(f"\n### Sanity checks: cascading randomisation from the top layer ({s['layers']} layers)\n")
    print("| layers reset | " + " | ".join(str(d) for d in s["depths"]) + " |")
    print("|---|" + "---|" * len(s["depths"]))
    for name, values in s["mprt"].items():
        print(f"| MPRT Spearman, {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    print("| model output Pearson | " + " | ".join(f"{v:.3f}" for v in s["output_pearson"]) + " |")
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
