"""Reading images safely, and the bundled sample photos (scikit-image and scikit-learn ship them offline).

``read_image(path) -> uint8 (3, H, W)`` RGB, upright (the EXIF orientation applied, as image viewers show it).
Grayscale, 1-bit, palette, transparent (composited on white), CMYK and 16-bit images are converted; an animated
GIF or PNG gives its first frame. Anything else raises ``ImageError`` with a one-line reason naming the file:
missing, a directory or other non-regular file, empty, unreadable, not an image, a format outside ``FORMATS``,
truncated or corrupt, or more than ``max_pixels`` pixels. The pixel count comes from the header and is checked
before any pixel is decoded, so a decompression bomb (a small file that claims a huge image) costs nothing.

Thread-safe and free of global side effects: Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``, a module
global that ``Image.open`` consults and that only a global change or a global warning filter can adjust) is
not used; the format plugin is called directly and ``max_pixels`` is the only limit.
``probe_image(path) -> (W, H)`` runs the same checks on the header alone (no pixel decoded), to refuse a bad
input before anything expensive happens. ``limit_aspect(image)`` trims extremely elongated images before they
are resized (see there).
"""
from __future__ import annotations

import os
import stat
import struct

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MAX_PIXELS = 50_000_000  # refuse larger images: a decompression bomb would otherwise exhaust memory
MAX_ASPECT = 32          # limit_aspect: longer images keep their central 32:1 band

# Pillow plugins used for decoding. Others (EPS runs Ghostscript, and dozens of rarely audited formats) are
# recognised by their signature only, to name them in the refusal.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")

SAMPLES = ("chelsea", "coffee", "rocket", "motorcycle", "china", "flower")


class ImageError(ValueError):
    """An image file that cannot be used; ``str(err)`` is a one-line reason naming the file.

    ``err.path`` is the path as given (None for errors about no particular file) and ``err.reason`` the
    message without it, e.g. ``"empty file"``.
    """

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason if reason is not None else message


def printable(text: str) -> str:
    """``text`` with control characters, newlines and undecodable bytes (lone surrogates) escaped, so that a
    file name never breaks a one-line message or a strict UTF-8 stream."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _refuse(path: str, reason: str) -> ImageError:
    return ImageError(f"{printable(path)}: {reason}", path=path, reason=reason)


def read_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Decode ``path`` to a ``uint8 (3, H, W)`` RGB tensor, or raise ``ImageError`` naming the file and why.

    max_pixels: refuse images whose header claims more than ``W * H = max_pixels`` pixels, before decoding.
    """
    path = _check_path(path, max_pixels)
    with _open_file(path) as f:
        try:
            im = _header(path, f, max_pixels)
            im.load()
            arr = _to_rgb(im)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # only a GIF frame larger than its logical screen reaches Pillow's own check (while parsing)
            raise _refuse(path, f"refused as a possible decompression bomb ({_why(e)})") from None
        except MemoryError:
            raise _refuse(path, "not enough memory to decode it") from None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data; each is this file's fault
            # also a warning that a strict filter (python -W error) turned into an exception, e.g. corrupt EXIF
            raise _refuse(path, f"corrupt or truncated image ({_why(e)})") from None
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def probe_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header of ``path``, decoding no pixel; raises ``ImageError`` for every
    reason ``read_image`` would except damage only decoding finds (a truncated or corrupt body).

    Cheap (one ``stat``, one open, the first bytes read): the command line checks every input with it before
    it loads a model. A pipe or device is refused from ``stat`` alone, never opened.
    """
    path = _check_path(path, max_pixels)
    with _open_file(path) as f:
        try:
            return _header(path, f, max_pixels).size
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _refuse(path, f"refused as a possible decompression bomb ({_why(e)})") from None
        except Exception as e:  # noqa: BLE001 - as in read_image: a header Pillow chokes on is this file's fault
            raise _refuse(path, f"corrupt or truncated image ({_why(e)})") from None


def _check_path(path: str | os.PathLike, max_pixels: int) -> str:
    """The path as ``str``, after ``stat`` says it is a non-empty regular file (else ``ImageError``)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    path = os.fsdecode(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _refuse(path, "no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise _refuse(path, f"cannot read ({_why(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open forever; /dev/zero would never end
        raise _refuse(path, "not a regular file (a pipe, socket or device), not an image")
    if st.st_size == 0:
        raise _refuse(path, "empty file")
    return path


def _open_file(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise _refuse(path, f"cannot read ({_why(e)})") from None


def _header(path: str, f, max_pixels: int):
    """The lazily opened PIL image of ``f``, its size checked against ``max_pixels`` (no pixel decoded)."""
    try:
        im = _open(f)
    except _Unidentified as e:
        raise _refuse(path, str(e)) from None
    w, h = im.size
    if w * h > max_pixels:
        raise _refuse(path, f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} (a possible "
                            f"decompression bomb); refused before decoding")
    if w < 1 or h < 1:
        raise _refuse(path, f"image has no pixels ({w}x{h})")
    return im


def _why(e: BaseException) -> str:
    """The first line of an exception's message, or its type name, at most 200 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return printable(text if len(text) <= 200 else text[:197] + "...")


class _Unidentified(Exception):
    pass


def _open(f):
    """``Image.open`` without its global bomb check and limited to ``FORMATS``: the plugin whose signature
    matches parses the header (lazily, as ``Image.open`` does); no pixel is decoded yet."""
    prefix = f.read(16)
    hints, broken = [], None
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in FORMATS:
            if fmt not in Image.OPEN:
                continue
            factory, accept = Image.OPEN[fmt]
            ok = accept(prefix) if accept else True
            if isinstance(ok, str):  # e.g. "image file could not be identified because AVIF support not installed"
                hints.append(ok)
            elif ok:
                f.seek(0)
                try:
                    return factory(f, "")
                except (SyntaxError, IndexError, TypeError, struct.error) as e:  # as in Image.open
                    broken = broken or f"corrupt or truncated {fmt} file ({_why(e)})"
    if broken:
        raise _Unidentified(broken)
    if hints:
        raise _Unidentified(f"not a readable image ({_why(Exception(hints[0]))})")
    for fmt in Image.ID:  # name the format, without parsing anything
        if fmt not in FORMATS and Image.OPEN[fmt][1] is not None and _accepts(Image.OPEN[fmt][1], prefix):
            raise _Unidentified(f"{fmt} files are not supported (funcam reads {', '.join(FORMATS)})")
    raise _Unidentified("not an image file (unrecognised format)")


def _accepts(accept, prefix: bytes) -> bool:
    try:
        ok = accept(prefix)
    except Exception:  # noqa: BLE001 - a signature test that fails says no
        return False
    return bool(ok) and not isinstance(ok, str)


_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}  # EXIF orientation -> the transpose that makes the image upright


def _orientation(im) -> int:
    """The EXIF orientation (1..8; 1 when absent or unreadable), read from the raw EXIF bytes by hand: Pillow's
    ``getexif`` warns on slightly corrupt EXIF, which a strict warning filter would turn into a refusal."""
    tags = getattr(im, "tag_v2", None)  # TIFF: the orientation is a tag of the image itself
    if tags is not None:
        try:
            return int(tags.get(0x0112, 1))
        except (TypeError, ValueError):
            return 1
    data = im.info.get("exif")
    if not isinstance(data, bytes):
        return 1
    data = data[6:] if data.startswith(b"Exif\x00\x00") else data
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(data[:4])
    if order is None:
        return 1
    try:  # TIFF header -> IFD0 -> 12-byte entries (tag, type, count, value); orientation is tag 0x0112, SHORT
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (n,) = struct.unpack_from(order + "H", data, ifd)
        for i in range(n):
            tag, kind, count = struct.unpack_from(order + "HHI", data, ifd + 2 + 12 * i)
            if tag == 0x0112:
                return struct.unpack_from(order + "H", data, ifd + 10 + 12 * i)[0] if kind == 3 and count else 1
    except struct.error:
        pass
    return 1


def _to_rgb(im) -> np.ndarray:
    """A loaded PIL image -> upright ``uint8 (H, W, 3)``."""
    method = _TRANSPOSE.get(_orientation(im))
    if method is not None:
        im = im.transpose(getattr(Image.Transpose, method))
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale the full range to 8 bits instead of clipping at 255.
        a = np.asarray(im).astype(np.float32)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a * np.float32(255.0 / peak) + np.float32(0.5), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        g = np.clip(a * (255.0 if a.max(initial=0.0) <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in im.info and im.mode in ("P", "L", "RGB")):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError as e:  # a mode Pillow cannot convert to RGB (LAB, HSV, multi-channel TIFF, ...)
        raise ValueError(f"colour mode {im.mode} cannot be converted to RGB ({_why(e)})") from None


def limit_aspect(image: Tensor, max_ratio: int = MAX_ASPECT) -> Tensor:
    """``(C, H, W)`` -> the image itself, or, when one side is more than ``max_ratio`` times the other, its
    central ``max_ratio : 1`` band along the long side (a view).

    Preprocessing resizes the short side to about the model's input size and centre-crops a square; a 1 x 5000
    image would first be resized to 256 x 1,280,000 (4 GB of float32) only to keep its central 256 x 256. The
    band keeps everything the crop can see (at ``crop_pct`` <= ``max_ratio`` / 2) plus a wide margin, so the
    model input equals the untrimmed one up to the resampling offset of a fraction of a pixel.
    """
    h, w = image.shape[-2:]
    short, long_ = min(h, w), max(h, w)
    if long_ <= max_ratio * short:
        return image
    keep = max_ratio * short + (long_ - max_ratio * short) % 2  # same parity as long_: the centre stays put
    start = (long_ - keep) // 2
    return image[..., start:start + keep, :] if h > w else image[..., :, start:start + keep]


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
    return {k: torch.from_numpy(np.array(v, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
            for k, v in arrays.items()}
