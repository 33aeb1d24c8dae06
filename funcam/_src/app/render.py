"""Rendering in torch, on the maps' device: colormaps, alpha overlays, gradient images, labelled grids with a
colour scale, PNG files.

``colorize(maps (B, K, h, w)) -> uint8 (B, K, 3, h, w)``; ``overlay(image (B, 3, H, W), maps) -> uint8
(B, K, 3, H, W)``; ``gradient_image(grads (B, K, 3, H, W)) -> uint8 (B, K, 3, H, W)`` (Guided Backprop and
Guided Grad-CAM are images, not heatmaps); ``colorbar(cmap, width) -> uint8 (3, h, width)``; ``grid(tiles
(R, C, 3, H, W), legend=cmap) -> uint8 (3, H', W')``; ``save_png(image (3, H, W), path)``.
No cv2 and no matplotlib: a colormap is a 256-entry table indexed like matplotlib's (``floor(t * 256)``),
so colours equal matplotlib's at every value. Pillow draws the grid labels and writes the files.

>>> import torch
>>> colorize(torch.tensor([[[[0.0, 1.0]]]]), "jet")[0, 0, :, 0, 0].tolist()  # jet(0) is dark blue
[0, 0, 128]
>>> # signed: 0 is white (to 1/255, as matplotlib's)
>>> colorize(torch.tensor([[[[-2.0, 0.0, 1.0]]]]), "bwr")[0, 0, :, 0, 1].tolist()
[255, 254, 254]
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from funcam._src.app.files import atomic_write

__all__ = ["CMAPS", "colormap_table", "colorize", "to_uint8", "overlay", "gradient_image", "colorbar", "legend_labels",
           "draw_boxes", "grid", "save_png"]

CMAPS = ("jet", "turbo", "hot", "viridis", "bwr")
SIGNED_CMAPS = ("bwr",)

# Piecewise-linear definitions, channel -> ((x, value), ...). jet is MATLAB's jet; hot is MATLAB's hot as
# published for 64 colours (red ramps over the first 3/8, green the next 3/8, blue the last 1/4); bwr is the
# straight blue -> white -> red diverging map.
_SEGMENTS = {
    "jet": (((0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)),
            ((0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)),
            ((0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0))),
    "hot": (((0, 0.0416), (23 / 63, 1), (1, 1)),
            ((0, 0), (23 / 63, 0), (47 / 63, 1), (1, 1)),
            ((0, 0), (47 / 63, 0), (1, 1))),
    "bwr": (((0, 0), (0.5, 1), (1, 1)),
            ((0, 0), (0.5, 1), (1, 0)),
            ((0, 1), (0.5, 1), (1, 0))),
}

# turbo (Mikhailov 2019) and viridis (van der Walt & Smith 2015) are published as 256-colour tables, not
# formulas. This is data, not code: 65 equally spaced knots (x = i / 64) of each table as RGB uint16
# (value * 65535), 4 hex digits each, generated once offline with matplotlib:
#   np.interp(np.linspace(0, 1, 65), np.arange(256) / 255, colormaps[name](np.arange(256) / 255)[:, c])
# Linear interpolation between the knots rebuilds the 256 colours within 0.5/255.
_KNOTS = {
    "turbo": (
        "30a0125f3b6f35621e2b587b399129c6733e3d2e35338bb7403b406ea1e742b44b7ab5cd449c5656c76945f26102d6bc"
        "46b66b7ee3c646e875caee8546887fe6f6fb457789d9fd0d426593e5ffa13d679e06feca371ba81dfb0a301ab20bf4e3"
        "2900bbb1ecd82268c4f0e36c1cedcda8d920192bd5bace7817bddd08c3f4193ee372ba191e31e8feb0a4265eee08a5ad"
        "3134f28b996e3e22f67b8c534c95f9cb7ecb5bfcfc6e71426bc6fe5764277b62ff7957e68a3dffc64ced97c6ff3243a9"
        "a36ffdaf3c89adfbfb2137c6b875f7833513c2baf2ef340acca4ed803445d60fe74f355eded3e07736eee6ccd9123891"
        "edd5d13939dff3c7c9083a73f87cc09739e8fbd6b7ee37e2fdf9ae5234b8ff07a3b930bdff0c98612c23fe198c8b271f"
        "fc3d807721e3f98674631ca3f60568901791f1c75d3c12e0ecdd52a80ec5e75449140b71e130408808edda50387b06c9"
        "d2af30e004fcca5129b60384c13223000264b7541cba0199acb716e70125a15911860107953d0c96013f8862081901cf"
        "7ac7040d02b3"),
    "viridis": (
        "445a013f545445c706865a5e46e80cd7602347bd12ba659c484518396ac2487f1d836f8d486c22ad73fa480e27c17802"
        "47672cc57ba4467c31b97ede4552369c81b343f03b6e8426425f402c863d40a744d488003ed1496589763ce64ddf8aaa"
        "3af052408ba538f6568a8c6e36ff5abe8d1035125edd8d90333362e98df5316466e48e452fa66ad18e822dfa6eb18eb0"
        "2c5d72878ecf2ace76568edf29497a1f8ee127ca7de38ed1265081a68ead24dc85678e71236f89278e1a22118ce98da3"
        "20ce90aa8d071fbb946c8c411ef2982e8b4d1e969bef8a261ecd9fae88c81fbfa36a872e2187a72185542434aad18337"
        "27c7ae7980d42c33b2157e283167b5a57b31374cb92577ee3dd1bc93745c44e2bfec707c4c73c32f6c4b5477c65867c9"
        "5ce4c96462f765b1cc525dd56ed8cf1d58637850d1c652a48212d4484c998c17d6a246489656d8d33fb6a0c6dadb38ef"
        "ab5adcb93208b606de712b25c0bbe0052485cb68e17a1e9fd5fee2d71a3be06be4241863eaa2e56819cff497e6ad1e43"
        "fe45e7f924d9"),
}


def _check_cmap(cmap: str) -> str:
    if cmap not in CMAPS:
        raise ValueError(f"cmap must be one of {', '.join(CMAPS)}; got {cmap!r}")
    return cmap


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear ``np.interp`` for increasing ``xp (n,)``: ``x (m,) -> (m,)``."""
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * ((x - x0) / (x1 - x0))


@functools.lru_cache(maxsize=None)
def _table64(cmap: str) -> Tensor:
    x = torch.arange(256, dtype=torch.float64) / 255  # the colour of entry i is the map at i / 255
    if cmap in _SEGMENTS:
        chans = [torch.tensor(seg, dtype=torch.float64) for seg in _SEGMENTS[cmap]]
        return torch.stack([_interp(x, c[:, 0].contiguous(), c[:, 1]) for c in chans], dim=1)
    hexs = _KNOTS[cmap]
    knots = torch.tensor([int(hexs[i:i + 4], 16) for i in range(0, len(hexs), 4)], dtype=torch.float64)
    knots = knots.view(-1, 3) / 65535
    xp = torch.linspace(0, 1, knots.shape[0], dtype=torch.float64)
    return torch.stack([_interp(x, xp, knots[:, c]) for c in range(3)], dim=1)


def colormap_table(cmap: str = "jet", *, device: torch.device | str | None = None) -> Tensor:
    """The 256 colours of ``cmap`` as float32 ``(256, 3)`` in [0, 1] (entry i is the colour of i / 255)."""
    return _table64(_check_cmap(cmap)).to(device=device, dtype=torch.float32)


def _bound(v: float | Tensor | None, default: Tensor) -> Tensor:
    if v is None:
        return default
    if isinstance(v, Tensor):
        return v.to(default).expand_as(default) if v.ndim == 0 else v.to(default).reshape(default.shape)
    return torch.full_like(default, float(v))


def _scale(maps: Tensor, cmap: str, vmin, vmax) -> Tensor:
    """Raw values ``(B, K, h, w)`` -> positions ``t`` in [0, 1] along the colormap."""
    m = maps.float()
    lo = _bound(vmin, m.amin(dim=(-2, -1), keepdim=True))
    hi = _bound(vmax, m.amax(dim=(-2, -1), keepdim=True))
    if cmap in SIGNED_CMAPS:
        # matplotlib TwoSlopeNorm(vcenter=0): [vmin, 0] -> [0, 0.5] and [0, vmax] -> [0.5, 1], two slopes, so
        # 0 is always the centre colour (white) whatever the range; the range is widened to include 0.
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        t = torch.where(m < 0, 0.5 + 0.5 * m / (-lo).clamp(min=1e-30), 0.5 + 0.5 * m / hi.clamp(min=1e-30))
    else:
        # matplotlib Normalize: (v - vmin) / (vmax - vmin), and 0 for a constant map.
        span = hi - lo
        t = torch.where(span > 0, (m - lo) / span.clamp(min=1e-30), torch.zeros_like(m))
    return t.nan_to_num(0.0).clamp(0, 1)


def colorize(maps: Tensor, cmap: str = "jet", *, vmin: float | Tensor | None = None,
             vmax: float | Tensor | None = None) -> Tensor:
    """maps ``(B, K, h, w)`` -> RGB ``uint8 (B, K, 3, h, w)`` on the maps' device.

    vmin / vmax: the values drawn as the first / last colour; a number, or a tensor broadcastable to
    ``(B, K, 1, 1)``; None: each map's own minimum / maximum. For the signed ``bwr`` map the range is widened
    to include 0 and 0 is white (``TwoSlopeNorm(vcenter=0)``): negative values blue, positive red.
    """
    if not isinstance(maps, Tensor) or maps.ndim != 4:
        raise ValueError(f"maps must be a (B, K, h, w) tensor, got "
                         f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    table = colormap_table(cmap, device=maps.device).mul(255).round().to(torch.uint8)
    # matplotlib's lookup: entry floor(t * 256), with t == 1 -> the last entry.
    idx = (_scale(maps, cmap, vmin, vmax) * 256).long().clamp(0, 255)
    return table[idx].permute(0, 1, 4, 2, 3).contiguous()


def to_uint8(image: Tensor, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
    """image ``(B, 3, H, W)``: uint8 as is, or float (normalised with ``mean``/``std``, else in [0, 1]) ->
    ``uint8 (B, 3, H, W)``."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be a (B, 3, H, W) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    if image.dtype == torch.uint8:
        if mean is not None or std is not None:
            raise ValueError("mean/std undo a normalisation; a uint8 image is not normalised")
        return image
    if not image.is_floating_point():
        raise TypeError(f"image must be uint8 or floating point, got {image.dtype}")
    x = image.float()
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the normalisation to undo), or neither")
    if mean is not None:
        x = x * x.new_tensor(std).view(1, 3, 1, 1) + x.new_tensor(mean).view(1, 3, 1, 1)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def overlay(image: Tensor, maps: Tensor, *, alpha: float = 0.5, cmap: str = "jet",
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            vmin: float | Tensor | None = None, vmax: float | Tensor | None = None) -> Tensor:
    """Blend colourised maps over their images: ``round((1 - alpha) * image + alpha * colour)``.

    image: ``(B, 3, H, W)`` uint8, or float normalised with ``mean``/``std`` (undone here; None: already in
    [0, 1]). maps: ``(B, K, h, w)`` raw maps, upsampled bilinearly to ``(H, W)`` before colouring.
    Returns ``uint8 (B, K, 3, H, W)``.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    img = to_uint8(image, mean=mean, std=std)
    if not isinstance(maps, Tensor) or maps.ndim != 4 or maps.shape[0] != img.shape[0]:
        raise ValueError(f"maps must be (B, K, h, w) with B = {img.shape[0]} (the images), got "
                         f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    size = img.shape[-2:]
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    heat = colorize(maps.to(img.device), cmap, vmin=vmin, vmax=vmax).float()
    blend = (1 - alpha) * img.float().unsqueeze(1) + alpha * heat
    return blend.round().clamp(0, 255).to(torch.uint8)


def gradient_image(grads: Tensor) -> Tensor:
    """Input gradients ``(B, K, C, H, W)`` (C = 3, or 1 for a channel-reduced map) -> ``uint8 (B, K, 3, H, W)``,
    drawn as an image the way Springenberg et al. 2015 and Selvaraju et al. 2017 show Guided Backprop and
    Guided Grad-CAM: each map centred on its mean, scaled to 0.1 per standard deviation around mid-grey
    (``0.5 + 0.1 * (g - mean) / (std + 1e-5)``, clipped to [0, 1]), so the mean is grey, positive
    gradients light and negative ones dark, per colour channel. The same arithmetic as keras-grad-cam's and
    pytorch-grad-cam's ``deprocess_image``, batched; a heat colormap of such a gradient looks uniformly blue.
    """
    if not isinstance(grads, Tensor) or grads.ndim != 5 or grads.shape[2] not in (1, 3):
        raise ValueError(f"grads must be a (B, K, 3, H, W) or (B, K, 1, H, W) tensor, got "
                         f"{tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__}")
    g = grads.detach().float()
    mean = g.mean(dim=(2, 3, 4), keepdim=True)
    std = g.std(dim=(2, 3, 4), keepdim=True, correction=0)
    t = ((g - mean) / (std + 1e-5) * 0.1 + 0.5).clamp(0, 1)
    return (t * 255).to(torch.uint8).expand(-1, -1, 3, -1, -1).contiguous()  # truncation, as np.uint8(t * 255)


def legend_labels(cmap: str) -> tuple[str, ...]:
    """What the ends (and the centre) of ``cmap``'s colour scale mean for maps scaled per map (``colorize``'s
    default range): the minimum and maximum of each map, or, for signed ``bwr``, zero at the centre."""
    return ("most negative", "0", "most positive") if _check_cmap(cmap) in SIGNED_CMAPS else \
        ("map minimum", "map maximum")


def colorbar(cmap: str = "jet", width: int = 256, *, labels: Sequence[str] | None = None, bar_height: int = 10,
             label_height: int = 16) -> Tensor:
    """A colour scale legend: ``uint8 (3, bar_height + label_height, width)``, the colours of ``cmap`` from left
    (value 0) to right (value 1) as ``colorize`` draws them, over ``labels`` spread evenly beneath it (first
    left-aligned, last right-aligned; default ``legend_labels(cmap)``)."""
    if width < 2 or bar_height < 1 or label_height < 0:
        raise ValueError(f"colorbar needs width >= 2, bar_height >= 1 and label_height >= 0, got {width}, "
                         f"{bar_height}, {label_height}")
    t = torch.linspace(0, 1, width, dtype=torch.float64)
    idx = (t * 256).long().clamp(0, 255)  # colorize's lookup, entry floor(t * 256)
    table = colormap_table(cmap).mul(255).round().to(torch.uint8)
    bar = table[idx].T[:, None, :].expand(3, bar_height, width)
    canvas = Image.new("RGB", (width, label_height), "white")
    labels = legend_labels(cmap) if labels is None else labels
    if label_height and labels:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=max(8, min(13, label_height - 3)))
        n = len(labels)
        for i, text in enumerate(labels):
            x = 0 if n == 1 or i == 0 else width - 1 if i == n - 1 else round(i * (width - 1) / (n - 1))
            anchor = "lm" if i == 0 else "rm" if i == n - 1 else "mm"
            draw.text((x, label_height // 2), str(text), fill="black", font=font, anchor=anchor)
    import numpy as np

    text = torch.from_numpy(np.array(canvas, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return torch.cat([bar, text], dim=1).contiguous()


def _label_strip(texts: Sequence[str], widths: Sequence[int], height: int, pad: int, vertical: bool) -> Tensor:
    """Text labels drawn by Pillow: a ``uint8 (3, height, sum(widths) + pads)`` strip (transposed layout for
    row labels when ``vertical``)."""
    font = ImageFont.load_default(size=max(8, min(14, height - 6)) if not vertical else 13)
    if vertical:  # one label per row, left of it: widths are the rows' heights, height the column width
        canvas = Image.new("RGB", (height, sum(widths) + pad * (len(widths) + 1)), "white")
    else:
        canvas = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), height), "white")
    draw = ImageDraw.Draw(canvas)
    offset = pad
    for text, size in zip(texts, widths):
        room = (height if vertical else size) - 4
        text = str(text)
        while text and draw.textlength(text, font=font) > room:  # truncate what does not fit, with an ellipsis
            text = text[:-2] + "…" if len(text) > 1 else ""
        if vertical:
            draw.text((2, offset + size // 2), text, fill="black", font=font, anchor="lm")
        else:
            draw.text((offset + size // 2, height // 2), text, fill="black", font=font, anchor="mm")
        offset += size + pad
    import numpy as np

    return torch.from_numpy(np.array(canvas, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def draw_boxes(images: Tensor, boxes: Tensor, *, width: int = 2, color: Sequence[int] = (255, 255, 255)) -> Tensor:
    """Rectangle outlines: images ``uint8 (N, 3, H, W)``, boxes ``(N, 4)`` (x0, y0, x1, y1) in pixels, one per image
    -> a copy with each box drawn ``width`` pixels wide in ``color`` just inside its edges, and one black pixel just
    outside them (visible on light and dark images alike). Parts outside the image are not drawn."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.dtype != torch.uint8 or \
            not isinstance(boxes, Tensor) or tuple(boxes.shape) != (images.shape[0], 4):
        raise ValueError(f"draw_boxes needs uint8 images (N, 3, H, W) and boxes (N, 4), got "
                         f"{getattr(images, 'shape', images)!r} and {getattr(boxes, 'shape', boxes)!r}")
    out = images.clone()
    h, w = images.shape[-2:]
    ys = torch.arange(h, device=images.device)[:, None]
    xs = torch.arange(w, device=images.device)[None, :]
    ink = out.new_tensor(list(color)).view(3, 1)
    for img, (x0, y0, x1, y1) in zip(out, boxes.round().long().tolist()):
        for k in range(-1, width):  # ring k: k pixels inside the box's edge (-1: just outside it)
            a, b, c, d = x0 + k, y0 + k, x1 - 1 - k, y1 - 1 - k
            ring = (xs >= a) & (xs <= c) & (ys >= b) & (ys <= d) & ((xs == a) | (xs == c) | (ys == b) | (ys == d))
            img[:, ring] = ink.expand(3, int(ring.sum())) if k >= 0 else 0
    return out


def grid(tiles: Tensor, *, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
         pad: int = 4, label_size: int = 20, row_label_width: int = 110, legend: str | None = None,
         legend_text: Sequence[str] | None = None) -> Tensor:
    """tiles ``uint8 (R, C, 3, H, W)`` (rows = images or methods, columns = classes or methods) -> one
    ``uint8 (3, H', W')`` image with ``pad`` white pixels between tiles, column labels above and row labels
    to the left (drawn with Pillow's default font, truncated to fit).

    legend: a colormap name: a ``colorbar`` of it under the tiles, as wide as they are, labelled
    ``legend_text`` (default ``legend_labels(legend)``)."""
    if not isinstance(tiles, Tensor) or tiles.ndim != 5 or tiles.shape[2] != 3 or tiles.dtype != torch.uint8:
        raise ValueError(f"tiles must be a uint8 (R, C, 3, H, W) tensor, got "
                         f"{(tiles.dtype, tuple(tiles.shape)) if isinstance(tiles, Tensor) else type(tiles).__name__}")
    r, c, _, h, w = tiles.shape
    for name, labels, n in (("row_labels", row_labels, r), ("col_labels", col_labels, c)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} must have {n} entries, got {len(labels)}")
    canvas = tiles.new_full((3, pad + r * (h + pad), pad + c * (w + pad)), 255)
    for i in range(r):
        for j in range(c):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top:top + h, left:left + w] = tiles[i, j]
    if col_labels is not None:
        strip = _label_strip(col_labels, [w] * c, label_size, pad, vertical=False).to(canvas.device)
        canvas = torch.cat([strip, canvas], dim=1)
    if row_labels is not None:
        strip = _label_strip(row_labels, [h] * r, row_label_width, pad, vertical=True).to(canvas.device)
        top = canvas.shape[1] - strip.shape[1]
        strip = torch.cat([strip.new_full((3, top, strip.shape[2]), 255), strip], dim=1)
        canvas = torch.cat([strip, canvas], dim=2)
    if legend is not None:
        bar = colorbar(legend, c * (w + pad) - pad, labels=legend_text).to(canvas.device)
        left = canvas.shape[2] - (c * (w + pad) + pad) + pad  # under the tiles, not the row labels
        band = canvas.new_full((3, bar.shape[1] + pad, canvas.shape[2]), 255)
        band[:, :bar.shape[1], left:left + bar.shape[2]] = bar
        canvas = torch.cat([canvas, band], dim=1)
    return canvas


def save_png(image: Tensor, path: str | os.PathLike) -> str:
    """Write ``uint8 (3, H, W)`` RGB to ``path`` as PNG (atomically: a temporary file, then a rename, so a
    reader never sees half a file, and a failed write leaves no file behind). Returns the path."""
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be a uint8 (3, H, W) tensor, got "
                         f"{(image.dtype, tuple(image.shape)) if isinstance(image, Tensor) else type(image).__name__}")
    pixels = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    return atomic_write(path, lambda f: pixels.save(f, format="PNG"))
