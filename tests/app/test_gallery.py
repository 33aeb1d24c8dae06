"""The HTML gallery without a browser: every caption escaped, the colour scale legend as the colormap's own
colours, and a page that is written whole or not at all (the browser renders it in test_gallery_browser.py)."""
import re

import pytest

from funcam._src.app.gallery import Figure, Legend, Section, render_gallery, write_gallery
from tests.conftest import FullDisk


def test_legend_is_a_gradient_of_the_given_colours_with_escaped_labels():
    legend = Legend(["#000080", "#7dff7a", "#800000"], ["map minimum", "<b>max</b>"], "scale & meaning")
    page = render_gallery([Section("a", "b", [[Figure("x.png", "c")]])], legend=legend)
    assert "linear-gradient(to right, #000080 0.00%, #7dff7a 50.00%, #800000 100.00%)" in page
    assert "<span>map minimum</span><span>&lt;b&gt;max&lt;/b&gt;</span>" in page
    assert 'aria-label="scale &amp; meaning"' in page and "<b>" not in page
    assert page.index('class="legend"') < page.index("<section>")  # under the title, above the photos
    assert 'class="legend"' not in render_gallery([Section("a", "b", [])])  # only when asked for
    for bad in (["#000080"], ["red", "#000000"], ["#0000801", "#000000"], ['#000000;}</style>', "#000000"]):
        with pytest.raises(ValueError, match="legend colors"):
            render_gallery([], legend=Legend(bad, [], ""))


def test_the_demo_legend_is_jet_as_colorize_draws_it():
    import torch

    from funcam._src.cli.explain import legend_of
    from funcam.render import colorize

    legend = legend_of("jet")
    t = torch.tensor([i / 16 for i in range(17)]).view(1, 1, 1, 17)
    want = colorize(t, "jet", vmin=0, vmax=1)[0, 0, :, 0].T.tolist()
    assert [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in legend.colors] == [tuple(w) for w in want]
    assert legend.labels == ("map minimum", "map maximum") and "mid-grey" not in legend.caption
    assert "mid-grey = the mean gradient" in legend_of("jet", guided=True).caption
    assert legend_of("bwr").labels == ("most negative", "0", "most positive")


def test_write_gallery_is_whole_or_absent(tmp_path, monkeypatch):
    path = write_gallery(tmp_path, [Section("t", "s", [[Figure("x.png", "c")]])], title="T")
    assert path == str(tmp_path / "index.html") and re.search("<h1>T</h1>", (tmp_path / "index.html").read_text())
    import builtins

    real_open = builtins.open

    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: FullDisk(real_open(p, *a, **k)) if ".tmp-" in str(p)
                        else real_open(p, *a, **k))
    with pytest.raises(OSError, match="No space left on device") as err:
        write_gallery(tmp_path, [Section("new", "s", [])], title="NEW")
    assert err.value.filename == str(tmp_path / "index.html")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # the old page, whole; no temporary
    assert "<h1>T</h1>" in (tmp_path / "index.html").read_text()
