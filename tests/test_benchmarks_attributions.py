"""benchmarks/attributions_speed.py runs end to end (its --quick configuration; no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # seven fresh processes of torch and captum: a benchmark, not a unit test
def test_attributions_benchmark_smoke(tmp_path):
    out = tmp_path / "attributions.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attributions_speed.py"), "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    # both methods, funcam beside captum; the script itself stops when their maps' checksums differ
    assert {(r["method"], r["who"]) for r in rows if r["k"] == 3} == {
        ("ig", "funcam"), ("ig", "captum"), ("smoothgrad", "funcam"), ("smoothgrad", "captum")}
    assert all(r["cpu"] > 0 and r["wall"] > 0 and (r["peak_growth_bytes"] is None or r["peak_growth_bytes"] > 0)
               for r in rows)
    for method in ("ig", "smoothgrad"):
        mine = next(r for r in rows if (r["method"], r["who"], r["k"]) == (method, "funcam", 3))
        theirs = [r for r in rows if (r["method"], r["who"], r["k"]) == (method, "captum", 3)]
        assert all(abs(mine["checksum"][1] - t["checksum"][1]) <= 1e-3 * abs(t["checksum"][1]) for t in theirs)
        # the ratio target is computed from these rows
        what = f"{method} resnet18 B=2 K=3 S=4: funcam CPU"
        goal = next(t for t in result["targets"] if t["target"].startswith(what))
        assert goal["measured"] == pytest.approx(mine["cpu"] / min(t["cpu"] for t in theirs))
        assert goal["met"] == (goal["measured"] <= 0.6)
    many = [r for r in rows if r["k"] == 1000]
    assert [r["who"] for r in many] == ["funcam"] and many[0]["checksum"][1] > 0
    assert any("K=1000" in t["target"] for t in result["targets"])
    assert "| ig | resnet18 64px, 2, 3, 4 | funcam | max_memory=128 MiB |" in proc.stdout
    assert "losses" in proc.stdout and "targets:" in proc.stdout
