"""Reading images safely, and the bundled sample photos (scikit-image and scikit-learn ship them offline).

``read_image(path) -> uint8 (3, H, W)`` RGB. Grayscale, palette, RGBA (composited on white), CMYK and 16-bit
images are converted; files that are missing, not images, truncated or larger than ``max_pixels`` raise
``ImageError`` with a one-line reason.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import Tensor

MAX_PIXELS = 50_000_000  # refuse larger images: a decompression bomb would otherwise exhaust memory

SAMPLES = ("chelsea", "coffee", "rocket", "motorcycle", "china", "flower")


class ImageError(ValueError):
    """An image file that cannot be used; ``str(err)`` is a one-line reason naming the file."""


def read_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Decode ``path`` to a ``uint8 (3, H, W)`` RGB tensor, or raise ``ImageError`` naming the problem."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} pixels is more than the limit of {max_pixels} "
                                     f"(max_pixels); refusing a possible decompression bomb")
                im.load()
                arr = _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _to_rgb(im) -> np.ndarray:
    """A loaded PIL image -> ``uint8 (H, W, 3)``."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale the full range to 8 bits instead of clipping at 255.
        a = np.asarray(im).astype(np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        g = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def sample_images() -> dict[str, Tensor]:
    """The bundled photos as ``uint8 (3, H, W)``: chelsea (a cat), coffee, rocket, motorcycle, china, flower.

    They come from scikit-image's and scikit-learn's wheels (``pip install 'funcam[demo]'``), no network.
    """
    try:
        from skimage import data
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        raise ImageError("the sample photos need scikit-image and scikit-learn: pip install 'funcam[demo]'") from e
    arrays = {
        "chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "china": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg"),
    }
    return {k: torch.from_numpy(np.array(v, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous() for k, v in arrays.items()}
