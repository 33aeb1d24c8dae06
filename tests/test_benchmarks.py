"""The peer and memory benchmarks run end to end (tiny smoke configurations; no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs the benchmark scripts end to end: a benchmark, not a unit test
def test_peers_benchmark_smoke(tmp_path):
    out = tmp_path / "peers.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    who = {r["who"] for r in rows}
    assert {"funcam", "autograd loop", "pytorch-grad-cam", "captum", "torchcam", "model forward"} <= who
    assert all(r["median_s"] > 0 for r in rows)
    assert "| gradcampp | 3 | funcam |" in proc.stdout
    # the README's compact table and the targets, computed from the same rows
    fwd = next(r for r in rows if r["model"] == "resnet18" and r["method"] == "forward")
    mine = next(r for r in rows if r["model"] == "resnet18" and r["method"] == "gradcam" and r["K"] == 1
                and r["who"] == "funcam")
    row = f"| resnet18 ({fwd['median_s']:.2f} s) | 1 | {mine['median_s']:.2f} | {mine['x_forward']:.2f} |"
    assert row in proc.stdout
    goals = {t["target"]: t for t in json.loads(out.read_text())["targets"]}
    pgc = next(r for r in rows if r["model"] == "resnet18" and r["method"] == "gradcam" and r["K"] == 1
               and r["who"] == "pytorch-grad-cam")
    t = goals["resnet18 gradcam K=1, speed-up over pytorch-grad-cam >="]
    assert t["measured"] == pgc["median_s"] / mine["median_s"] and t["met"] == (t["measured"] >= 2.0)
    # the routes beyond timm's pooled heads (--quick: a torchvision graph cut and timm resnet50), each beside its limit
    paths = json.loads(out.read_text())["paths"]
    assert {r["path"] for r in paths} == {"tv-resnet50", "resnet50"}
    timed = [r for r in paths if r["method"] != "forward"]
    assert {(r["method"], r["limit"]) for r in timed} >= {("gradcam", "forward"), ("guided_backprop", "model x K")}
    for r in timed:
        fwd = next(q for q in paths if q["path"] == r["path"] and q["method"] == "forward")
        assert r["limit_s"] > 0 and r["x_limit"] == r["median_s"] / r["limit_s"]
        if r["limit"] == "forward":
            assert r["limit_s"] == fwd["median_s"]
    assert any(r["who"] == "captum" and r["method"] == "guided_backprop" for r in timed)
    assert "| path (one forward) | method | K |" in proc.stdout


@pytest.mark.slow  # runs the benchmark scripts end to end: a benchmark, not a unit test
def test_memory_per_configuration_benchmark_smoke(tmp_path):
    # benchmarks/memory.py --quick: one fresh process per configuration (resnet18 at 64 px); the parent checks
    # that configurations of one method computed the same maps, the children that the maps are not all zero.
    out = tmp_path / "memory.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--quick", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"fast-baseline", "general-baseline", "fast-gradcam-defaults", "fast-gradcam-explain",
                         "general-gradcampp-16MiB"}
    assert all(r["process_peak_bytes"] > 0 and min(r["times_s"]) > 0 for r in rows.values())
    assert rows["fast-gradcam-defaults"]["checksum"] == rows["fast-gradcam-explain"]["checksum"]
    assert rows["fast-gradcam-defaults"]["checksum"][1] > 0  # the sum of |maps|
    assert data["meta"]["sizes"]["fast"] == {"batch": 4, "size": 64, "k": 10, "title": "Average-pool fast path",
                                             "model": "resnet18"}
    assert "| gradcam | funcam.explain.explain (runs under no_grad) |" in proc.stdout


@pytest.mark.slow  # captures several zoo models (10 s)
def test_supported_models_rows_smoke():
    """benchmarks/supported_models.py on two of its rows, in this process: a timm CNN (timm's route) and a tiny
    Hugging Face ViT (the graph route, relevance), each against its autograd oracle; then the Markdown row."""
    import torch

    from benchmarks import supported_models as sm

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {r.id: sm.run_row(r, 300) for r in sm.ROWS if r.id in ("timm-resnet", "hf-vit")}
    finally:
        torch.set_num_threads(n)
    cnn, vit = rows["timm-resnet"], rows["hf-vit"]
    assert (cnn["status"], cnn["cut"], cnn["layout"], cnn["guided"]) == ("ok", "forward_features", "NCHW 2x2 (timm)",
                                                                         "ok")
    assert (vit["status"], vit["cut"], vit["layout"], vit["relevance"]) == (
        "ok", "vit.layers.1.layernorm_before", "tokens 1+4x4 (graph)", "ok (2 attentions)")
    assert max(cnn["gradcam_error"], vit["gradcam_error"]) <= sm.TOL
    assert cnn["lrp"].startswith("ok (") and vit["lrp"].startswith("ok (")  # three conservation errors each
    table = sm.markdown([cnn, vit])
    assert "| ViT | transformers `ViTForImageClassification` (tiny config) @ 32px | `vit.layers.1.layernorm_before` |" \
           in table
