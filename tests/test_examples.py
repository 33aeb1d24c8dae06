"""Run every script in examples/ as a user would (a fresh interpreter) and check its final marker.

Each example asserts its own numbers (maps equal a reference, training converges) and prints
"<name> OK" last; all of them finish in well under 30 s on 2 CPU cores.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["quickstart", "many_classes", "train_with_cam_loss", "vit_and_multilayer", "compiled", "vit_rollout",
            "signed_maps",
            "multilayer_fusion", "segmentation", "embedding_similarity"]


def test_every_example_is_listed():
    assert sorted(p.stem for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


# The quickstart stays in the fast set; the others are whole programs (training loops, compiles) and run in
# the slow set, which CI runs too.
@pytest.mark.parametrize("name", [n if n == "quickstart" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXAMPLES])
def test_example_runs(name):
    env = dict(os.environ, PYTHONWARNINGS="error")  # the examples run without a warning
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"examples/{name}.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.rstrip().splitlines()[-1] == f"{name} OK", proc.stdout


@pytest.mark.slow  # a fresh interpreter importing torch: about 7 s
def test_plain_import_reaches_every_documented_module():
    # issue 16: funcam.explain.explain raised AttributeError after a plain `import funcam`
    code = "import funcam; print(funcam.explain.explain.__module__, funcam.metrics.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="error"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "funcam._src.app.explain funcam.metrics\n", "")


@pytest.mark.slow  # every README snippet: about 20 s; the quickstart example stays fast
def test_readme_python_snippets_run():
    """The ```python blocks of README.md, run in order in one namespace (a later block may use an
    earlier block's names, as a reader following along would)."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 4
    script = "\n".join(f"# --- README block {i}\n{b}" for i, b in enumerate(blocks))
    env = dict(os.environ, PYTHONWARNINGS="error")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"a README snippet failed:\n{proc.stdout}\n{proc.stderr}"
