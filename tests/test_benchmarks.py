"""The peer benchmark runs end to end (a tiny smoke configuration; no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_bounds.py"), "--quick", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"forward", "gradcam", "general-64", "general-unchunked-100"} <= set(rows)
    assert all(r["peak_above_bytes"] >= 0 and r["seconds"] > 0 for r in rows.values())
