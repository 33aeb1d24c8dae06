"""A static HTML gallery of rendered maps: one self-contained ``index.html`` next to its PNGs.

Every name and caption is HTML-escaped and every image address percent-encoded, so a file called
``<script>.png`` shows as text. A small inline script marks the page once every image has loaded
(``<body data-images="ok 12/12">``, or ``"broken 11/12"``), which the browser test reads back.
"""
from __future__ import annotations

import html
import os
from typing import NamedTuple, Sequence
from urllib.parse import quote

__all__ = ["Figure", "Section", "render_gallery", "write_gallery"]


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


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin: 18px 0 2px; } p { margin: 2px 0 8px; color: #555; }
.row { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 6px; }
figure { margin: 0; width: 180px; } figure img { width: 180px; height: 180px; object-fit: cover; display: block; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
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


def render_gallery(sections: Sequence[Section], *, title: str = "funcam", intro: str = "") -> str:
    """The gallery page as a string (escaped; image addresses are file names relative to the page)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
             f"<script>{_SCRIPT}</script></head>", "<body>", f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2><p>{html.escape(sec.subtitle)}</p>")
        parts.extend('<div class="row">' + "".join(_figure(f) for f in row) + "</div>" for row in sec.rows)
        if sec.link is not None:
            parts.append(f'<p><a href="{_src(sec.link.src)}">{html.escape(sec.link.caption)}</a></p>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_gallery(directory: str | os.PathLike, sections: Sequence[Section], *, title: str = "funcam",
                  intro: str = "") -> str:
    """Write ``directory/index.html`` (atomically) and return its path."""
    path = os.path.join(os.fspath(directory), "index.html")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_gallery(sections, title=title, intro=intro))
    os.replace(tmp, path)
    return path
