"""benchmarks/cams_speed.py runs end to end (its --quick smoke configuration; no timing is asserted): every row,
the peers beside funcam, and the targets computed from the same rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs the benchmark script end to end (Score-CAM's masked forwards): a benchmark, not a unit test
def test_cams_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "cams.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cams_speed.py"), "--quick", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows, n = data["rows"], data["meta"]["classes"]
    assert all(r["median_s"] > 0 for r in rows)
    got = {(r["method"], r["K"], r["who"]) for r in rows}
    assert {("forward", 0, "model"), ("scorecam", 1, "funcam"), ("scorecam", n, "funcam"),
            ("scorecam", n, "pytorch-grad-cam"), ("scorecam", n, "torchcam"), ("ablationcam", n, "funcam"),
            ("ablationcam", 10, "funcam"), ("ablationcam", 10, "pytorch-grad-cam"), ("eigencam", 1, "funcam"),
            ("eigencam", 1, "pytorch-grad-cam")} <= got
    for m in ("eigengradcam", "finercam", "fullgrad", "shapleycam"):
        assert {(m, 10, "funcam"), (m, 10, "pytorch-grad-cam")} <= got
    # the peers linear in K are timed on --peer-classes classes and extrapolated, and say so
    pgc = next(r for r in rows if r["method"] == "scorecam" and r["who"] == "pytorch-grad-cam")
    assert pgc["extrapolated"] and pgc["median_s"] == pytest.approx(pgc["measured_s"] * n / pgc["timed_classes"])
    assert "| scorecam | 1 | funcam |" in proc.stdout and "(timed on 1, extrapolated)" in proc.stdout
    # the targets come from the same rows
    goals = {g["target"]: g for g in data["targets"]}
    mine = {(r["method"], r["K"], r["who"]): r["median_s"] for r in rows}
    g = goals[f"scorecam K={n} / funcam K=1 <="]
    assert g["measured"] == mine[("scorecam", n, "funcam")] / mine[("scorecam", 1, "funcam")]
    assert g["met"] == (g["measured"] <= 1.2)
    g = goals[f"scorecam K={n}, speed-up over torchcam >="]
    assert g["measured"] == mine[("scorecam", n, "torchcam")] / mine[("scorecam", n, "funcam")]
    g = goals["eigencam / one forward <="]
    assert g["measured"] == mine[("eigencam", 1, "funcam")] / mine[("forward", 0, "model")]
