"""Safe image reading (header-checked sizes, EXIF orientation) and the bundled sample photos.

Public names only; the implementation is in ``funcam._src.app.images``.
"""
from funcam._src.app.images import (
    MAX_ASPECT,
    MAX_PIXELS,
    ImageError,
    limit_aspect,
    probe_image,
    read_image,
    sample_images,
)

__all__ = [
    "ImageError",
    "MAX_ASPECT",
    "MAX_PIXELS",
    "limit_aspect",
    "probe_image",
    "read_image",
    "sample_images",
]
