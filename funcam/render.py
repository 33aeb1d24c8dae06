"""Maps to pictures in torch: colormaps, overlays, labelled grids with a colour scale, PNG files.

Public names only; the implementation is in ``funcam._src.app.render``.
"""
from funcam._src.app.render import (
    CMAPS,
    colorbar,
    colorize,
    colormap_table,
    draw_boxes,
    gradient_image,
    grid,
    legend_labels,
    overlay,
    save_png,
    to_uint8,
)

__all__ = [
    "CMAPS",
    "colorbar",
    "colorize",
    "colormap_table",
    "draw_boxes",
    "gradient_image",
    "grid",
    "legend_labels",
    "overlay",
    "save_png",
    "to_uint8",
]
