"""The Quantus speed and quality-metric benchmarks run end to end (--quick; no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # runs the benchmark script end to end: a benchmark, not a unit test
def test_quantus_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "quantus_speed.json"
    proc = _run("quantus_speed.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["metric"] for r in rows} == {"pixel_flipping", "region_perturbation", "infidelity"}
    for r in rows:
        assert r["funcam_s"] > 0 and r["quantus_s"] > 0 and r["speedup"] == r["quantus_s"] / r["funcam_s"]
        assert r["max_abs_diff"] <= 1e-4 * r["max_abs_value"]  # the two libraries computed the same numbers
    assert "| LeNet 1x28x28 (random weights) | pixel_flipping |" in proc.stdout


@pytest.mark.slow  # real Lite0 weights on two photos: a quality benchmark in small (1-5 min under load)
def test_quality_metrics_benchmark_smoke(tmp_path):
    out = tmp_path / "quality_metrics.json"
    proc = _run("quality_metrics.py", out)
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert set(rows) == {"gradcam", "random (7x7)", "centre", "sobel"}
    assert "rollout" in res["skipped"]  # attention rollout refuses a CNN, with its reason
    columns = set(rows["gradcam"]) - {"seconds (map metrics)", "seconds (recomputing metrics)"}
    assert len(columns) == 11 and all(columns <= set(r) for r in rows.values())  # every row has every column
    # the sanity checks separate a map that reads the model from a model-free one, on the real weights
    assert rows["sobel"]["MPRT, all layers reset (Spearman)"] == pytest.approx(1.0)
    assert rows["gradcam"]["MPRT, all layers reset (Spearman)"] < 0.5
    assert rows["sobel"]["random logit (SSIM)"] == pytest.approx(1.0)
    assert res["sanity"]["mprt"]["sobel"] == pytest.approx([1.0, 1.0])
    assert "| gradcam |" in proc.stdout and "MPRT Spearman, gradcam" in proc.stdout
