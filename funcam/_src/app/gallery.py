"""A static HTML gallery of rendered maps: one self-contained ``index.html`` next to its PNGs.

Every name and caption is HTML-escaped and every image address percent-encoded, so a file called
``<script>.png`` shows as text. A small inline script marks the page once every image has loaded
(``<body data-images="ok 12/12">``, or ``"broken 11/12"``), which the browser test reads back.
"""
from __future__ import annotations

import html
import os
import re
from typing import NamedTuple, Sequence
from urllib.parse import quote

from funcam._src.app.files import write_bytes

__all__ = ["Figure", "Section", "Legend", "render_gallery", "write_gallery"]


class Figure(NamedTuple):
    """One picture: ``src`` a file name relative to the gallery, ``caption`` plain text."""
    src: str
    caption: str


class Section(NamedTuple):
    """One input image: a heading, a line of plain text under it, and its rows of figures."""
    title: str
    subtitle: str
    rows: Sequence[Sequence[Figure]]
    link: Figure | None = None  # e.g. the comparison grid, linked under the rows


class Legend(NamedTuple):
    """A colour scale shown under the title: ``colors`` (``#rrggbb``, left to right, evenly spaced) drawn as a
    CSS gradient, ``labels`` spread evenly beneath it, and a ``caption`` (plain text) saying what it means."""
    colors: Sequence[str]
    labels: Sequence[str]
    caption: str


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin: 18px 0 2px; } p { margin: 2px 0 8px; color: #555; }
.row { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 6px; }
figure { margin: 0; width: 180px; } figure img { width: 180px; height: 180px; object-fit: cover; display: block; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
.legend { width: 360px; margin: 4px 0 12px; font-size: 12px; color: #555; }
.legend .bar { height: 12px; border: 1px solid #999; }
.legend .ticks { display: flex; justify-content: space-between; }
"""

# Sets <body data-images="ok N/N"> once every <img> is complete and decoded (naturalWidth > 0).
_SCRIPT = """
function funcamCheck() {
  const imgs = Array.from(document.images);
  if (imgs.some(i => !i.complete)) { setTimeout(funcamCheck, 25); return; }
  const ok = imgs.filter(i => i.naturalWidth > 0).length;
  document.body.dataset.images = (ok === imgs.length ? "ok " : "broken ") + ok + "/" + imgs.length;
}
window.addEventListener("load", funcamCheck);
"""


def _src(name: str) -> str:
    if os.path.isabs(name) or "/" in name or "\\" in name or name.startswith(".."):
        raise ValueError(f"gallery image names must be plain file names next to index.html, got {name!r}")
    return html.escape(quote(name), quote=True)


def _figure(fig: Figure) -> str:
    cap = html.escape(fig.caption)
    return (f'<figure><img src="{_src(fig.src)}" alt="{html.escape(fig.caption, quote=True)}">'
            f"<figcaption>{cap}</figcaption></figure>")


_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


def _legend(legend: Legend) -> str:
    if len(legend.colors) < 2 or not all(isinstance(c, str) and _COLOR.fullmatch(c) for c in legend.colors):
        raise ValueError(f"legend colors must be two or more '#rrggbb' strings, got {list(legend.colors)!r}")
    stops = ", ".join(f"{c} {100 * i / (len(legend.colors) - 1):.2f}%" for i, c in enumerate(legend.colors))
    ticks = "".join(f"<span>{html.escape(str(t))}</span>" for t in legend.labels)
    return (f'<div class="legend" role="img" aria-label="{html.escape(legend.caption, quote=True)}">'
            f'<div class="bar" style="background: linear-gradient(to right, {stops})"></div>'
            f'<div class="ticks">{ticks}</div><div>{html.escape(legend.caption)}</div></div>')


def render_gallery(sections: Sequence[Section], *, title: str = "funcam", intro: str = "",
                   legend: Legend | None = None) -> str:
    """The gallery page as a string (escaped; image addresses are file names relative to the page)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
             f"<script>{_SCRIPT}</script></head>", "<body>", f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if legend is not None:
        parts.append(_legend(legend))
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2><p>{html.escape(sec.subtitle)}</p>")
        parts.extend('<div class="row">' + "".join(_figure(f) for f in row) + "</div>" for row in sec.rows)
        if sec.link is not None:
            parts.append(f'<p><a href="{_src(sec.link.src)}">{html.escape(sec.link.caption)}</a></p>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_gallery(directory: str | os.PathLike, sections: Sequence[Section], *, title: str = "funcam",
                  intro: str = "", legend: Legend | None = None) -> str:
    """Write ``directory/index.html`` (atomically; nothing is left behind when the write fails) and return
    its path."""
    page = render_gallery(sections, title=title, intro=intro, legend=legend)
    return write_bytes(os.path.join(os.fspath(directory), "index.html"), page.encode("utf-8"))
