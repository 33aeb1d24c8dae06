"""The one batched perturbation engine of the Quantus-style metrics: checks and attributions once, then every
perturbed input of every image, class and step through the model in chunks sized by ``max_memory``.

Shapes: ``x (B, C, H, W)``; maps ``(B, K, h, w)`` at any resolution (upsampled bilinearly to ``(H, W)``) or
``(B, K, C, H, W)``; attributions ``a (B, K, C', H, W)`` with ``C' = 1`` for a map per pixel, ``C`` for input
attributions. A perturbation is described by ``groups (B, K, F)``: the step at which each of the ``F = C*H*W``
features of ``x`` is perturbed (Quantus ranks the map broadcast to ``x``'s shape, so a pixel is ``C`` features).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from funcam._src.core.engine import auto_chunk_size, resolve_classes
from funcam._src.core.metrics import score_of

# Bytes a no-grad forward keeps alive per input byte, with the perturbed input and its int64 step ids: a CNN's
# first stages hold several activations of many times the input's size (EfficientNet-Lite0 at 224 px: 96 channels
# at 112 x 112, 8x the input, each, with their batch-norm outputs). Small chunks also ran fastest on CPU (Lite0 at
# 224 px: 140-180 ms an image in batches of 4, 190 in 8, 250-280 in 16, 380-410 in 32; benchmarks/quantus_speed.py).
FORWARD_BYTES_PER_INPUT_BYTE = 32

MODES = ("cumulative", "single", "insertion")


class Setup(NamedTuple):
    """What every model metric needs, checked once. a: ``(B, K, C', H, W)`` float64 attributions (normalised and
    absolute as asked); classes: ``(B, K)``; y: ``(B, K)`` scores of the clean input (None without a model)."""
    x: Tensor
    a: Tensor
    classes: Tensor | None
    y: Tensor | None


def check_x(x: Any) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating (B, C, H, W) tensor, got {got}")


def attributions(maps: Any, x: Tensor, *, abs: bool, normalise: bool) -> Tensor:
    """maps ``(B, K, h, w)`` or ``(B, K, C, H, W)`` -> float64 ``(B, K, C', H, W)`` at ``x``'s resolution.

    ``normalise``: divided by the largest absolute value of each map (Quantus' ``normalise_by_max`` on one
    (image, class) pair; an all-zero map stays zero); then ``abs``: absolute values (Quantus' order).
    """
    b, c, h, w = x.shape
    if not isinstance(maps, Tensor) or maps.ndim not in (4, 5) or not maps.is_floating_point():
        got = f"{maps.dtype} {tuple(maps.shape)}" if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a floating (B, K, h, w) or (B, K, C, H, W) tensor, got {got}")
    if maps.shape[0] != b:
        raise ValueError(f"maps must have B = {b} maps like x, got shape {tuple(maps.shape)}")
    if maps.ndim == 5:
        if tuple(maps.shape[2:]) not in ((c, h, w), (1, h, w)):
            raise ValueError(f"maps (B, K, C, H, W) must have C, H, W = {(c, h, w)} like x, got {tuple(maps.shape)}")
        a = maps.detach().to(torch.float64)
    else:
        a = maps.detach().to(torch.float64)
        if tuple(a.shape[-2:]) != (h, w):
            a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False) if a.numel() else \
                a.new_zeros(a.shape[:2] + (h, w))
        a = a.unsqueeze(2)
    if normalise:
        top = a.abs().flatten(2).amax(dim=-1).view(a.shape[:2] + (1, 1, 1))
        a = torch.where(top > 0, a / torch.where(top > 0, top, torch.ones_like(top)), a)
    return a.abs() if abs else a


def setup(model: Callable | None, x: Tensor, maps: Tensor, classes: Any, *, abs: bool, normalise: bool,
          softmax: bool = False) -> Setup:
    """Check ``x``, ``maps`` and ``classes``; the attributions and, with a model, the clean scores ``(B, K)``."""
    check_x(x)
    a = attributions(maps, x, abs=abs, normalise=normalise)
    if model is None:
        return Setup(x, a, None, None)
    if classes is None:
        raise ValueError("classes must be given: the (K,) or (B, K) classes the K maps explain")
    with torch.no_grad():
        logits = model(x)
    idx = resolve_classes(classes, None, logits)
    if idx.shape != a.shape[:2]:
        raise ValueError(f"classes must give K = {a.shape[1]} classes per image like maps, got shape "
                         f"{tuple(idx.shape)}")
    return Setup(x, a, idx, score_of(logits, "softmax" if softmax else "logit").gather(1, idx))


def flat_features(a: Tensor, channels: int) -> Tensor:
    """a ``(B, K, C', H, W)`` -> ``(B, K, C*H*W)``: a map per pixel is repeated over the C channels of x."""
    b, k, _, h, w = a.shape
    return a.expand(b, k, channels, h, w).reshape(b, k, channels * h * w)


def rank_groups(values: Tensor, step: int, *, descending: bool) -> Tensor:
    """values ``(B, K, F)`` -> ``(B, K, F)`` step of each feature: ``rank // step`` in the order of ``values``.

    Ties keep the features' flat order (a stable sort): Quantus' ``np.argsort`` leaves the order of tied values
    to the sort algorithm, so the two agree whenever a step never splits a group of tied values.
    """
    order = values.argsort(dim=-1, descending=descending, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(values.shape[-1], device=values.device)
                                             .expand_as(order))
    return ranks // step


def baseline_value(x: Tensor, baseline: Any) -> Tensor:
    """The value ``(B,)`` that replaces perturbed features of each image, as Quantus' ``get_baseline_value``:
    'black' its minimum, 'white' its maximum, 'mean' its mean (over channels and pixels), or a number."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return x.new_full((x.shape[0],), float(baseline))
    if baseline == "black":
        return x.flatten(1).amin(dim=1)
    if baseline == "white":
        return x.flatten(1).amax(dim=1)
    if baseline == "mean":
        return x.flatten(1).mean(dim=1)
    raise ValueError(f"perturb_baseline must be 'black', 'white', 'mean' or a number, got {baseline!r}")


def chunk_for(x: Tensor, n: int, max_memory: int | None) -> int:
    """Inputs per forward so that about ``max_memory`` bytes of perturbed inputs and activations exist at once."""
    per = FORWARD_BYTES_PER_INPUT_BYTE * x[0].numel() * x.element_size()
    chunk = auto_chunk_size(per, max(n, 1), max_memory)
    return max(n, 1) if chunk is None else chunk


def prefers_channels_last(model: Callable, x: Tensor) -> bool:
    """Whether to hand the model its perturbed inputs channels-last: a module with 2-D convolutions on a
    multi-channel input. oneDNN's CPU convolutions run channels-last without reordering every activation
    (EfficientNet-Lite0 at 224 px, one thread: 84 against 96 ms an image in batches of 8, 82 against 141 one at a
    time; benchmarks/quantus_speed.py); the logits agree to float rounding (1e-6 on Lite0's)."""
    return x.shape[1] > 1 and isinstance(model, torch.nn.Module) and any(
        isinstance(m, torch.nn.Conv2d) for m in model.modules())


def predict(model: Callable, make: Callable[[Tensor], tuple[Tensor, Tensor]], n: int, x: Tensor, *,
            softmax: bool, max_memory: int | None) -> Tensor:
    """Scores ``(n,)`` or ``(n, K)``: ``make(j)`` builds inputs ``(len(j), C, H, W)`` and their classes ``(len(j),)``
    or ``(len(j), K)`` for the flat indices ``j``, a chunk at a time (``chunk_for``), under ``torch.inference_mode``,
    channels-last where ``prefers_channels_last`` (back to the input's layout for a model that refuses it, e.g. one
    that calls ``.view`` on its input)."""
    chunk = chunk_for(x, n, max_memory)
    layout = torch.channels_last if prefers_channels_last(model, x) else None
    out = []
    with torch.inference_mode():
        for s in range(0, n, chunk):
            inputs, cls = make(torch.arange(s, min(n, s + chunk), device=x.device))
            if layout is None:
                logits = model(inputs)
            else:
                try:
                    logits = model(inputs.contiguous(memory_format=layout))
                except RuntimeError:
                    layout, logits = None, model(inputs)
            scores = score_of(logits, "softmax" if softmax else "logit")
            out.append(scores.gather(1, cls.view(len(cls), -1)).view(cls.shape))
    # a normal tensor again (torch.cat outside inference mode): callers may use the scores in autograd
    return torch.cat(out) if out else x.new_zeros(0)


def feature_values(groups: Tensor, fill: Tensor) -> Tensor:
    """groups ``(..., F)`` step of each feature, fill ``(..., T)`` -> ``(..., F)`` the value a feature takes when it is
    perturbed, ``fill[group]`` (a step beyond ``T`` takes the last: such features are never perturbed)."""
    return fill.gather(-1, groups.clamp(0, fill.shape[-1] - 1))


def perturbed(x: Tensor, groups: Tensor, values: Tensor, step: Tensor, mode: str) -> Tensor:
    """Inputs ``(n, C, H, W)`` for ``n`` (image, class, step) triples.

    x: ``(n, C, H, W)`` their images; groups: ``(n, F)`` step of each feature; values: ``(n, F)`` the value each
    feature takes when perturbed (``feature_values``); step: ``(n,)``. mode 'cumulative': the features of steps
    ``<= step`` are replaced (pixel flipping); 'single': those of ``step`` only (faithfulness estimate);
    'insertion': the features of steps ``<= step`` show ``x`` on an all-``fill`` input (monotonicity, Arya et al.
    2019).
    """
    flat = x.flatten(1)
    s = step[:, None]
    values = values.to(flat.dtype)
    if mode == "cumulative":
        out = torch.where(groups <= s, values, flat)
    elif mode == "single":
        out = torch.where(groups == s, values, flat)
    else:
        out = torch.where(groups <= s, flat, values)
    return out.view_as(x)


def step_scores(model: Callable, st: Setup, groups: Tensor, fill: Tensor, steps: int, mode: str, *,
                softmax: bool, max_memory: int | None) -> Tensor:
    """Scores ``(B, K, steps)`` of the class of each map on the input perturbed up to each step (``perturbed``).

    groups: ``(B, K, F)``, or ``(B, 1, F)`` when the perturbation does not depend on the map (then one input per
    image and step serves all K classes); fill: ``(B, K or 1, steps)`` or broadcastable. The inputs are built and
    scored chunk by chunk: nothing of size ``steps x F`` exists at once.
    """
    b, k = groups.shape[0], st.classes.shape[1]
    shared = groups.shape[1] == 1 and fill.shape[1] == 1
    g = 1 if shared else k
    groups = groups.expand(b, g, groups.shape[2])
    # once per (image, class), not per step; int32 steps halve the bytes each chunk gathers
    values = feature_values(groups, fill.expand(b, g, fill.shape[-1])).to(st.x.dtype)
    groups = groups.to(torch.int32) if steps < 2 ** 31 else groups

    def make(j: Tensor) -> tuple[Tensor, Tensor]:
        bi, ki, ti = j // (g * steps), (j // steps) % g, j % steps
        cls = st.classes[bi] if shared else st.classes[bi, ki]
        return perturbed(st.x[bi], groups[bi, ki], values[bi, ki], ti, mode), cls

    out = predict(model, make, b * g * steps, st.x, softmax=softmax, max_memory=max_memory)
    return out.view(b, steps, k).transpose(1, 2) if shared else out.view(b, k, steps)


def block_groups(h: int, w: int, patch_size: int, device: torch.device) -> tuple[Tensor, int]:
    """Block id ``(H, W)`` of every pixel for Quantus' patches, and the number of blocks.

    Quantus pads the image to a multiple of ``patch_size`` (``floor`` of the padding before, ``ceil`` after, as
    ``utils.get_padding_size``) and cuts it into non-overlapping ``patch_size`` blocks in row-major order; a block
    covers every channel. Padding never reaches the model, so a block is its part inside the image.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    pad = [(patch_size - d % patch_size) % patch_size // 2 for d in (h, w)]
    rows = (torch.arange(h, device=device) + pad[0]) // patch_size
    cols = (torch.arange(w, device=device) + pad[1]) // patch_size
    nh, nw = -(-h // patch_size), -(-w // patch_size)
    return rows[:, None] * nw + cols[None, :], nh * nw


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def group_sums(values: Tensor, groups: Tensor, steps: int) -> Tensor:
    """values ``(B, K, F)`` (or ``(B, 1, F)``), groups ``(B, K, F)`` -> ``(B, K, steps)`` sums per group; features
    with a group outside ``[0, steps)`` are left out."""
    b, k, f = groups.shape
    inside = (groups >= 0) & (groups < steps)
    v = torch.where(inside, values.expand(b, k, f), values.new_zeros(()))
    return v.new_zeros((b, k, steps + 1)).scatter_add_(2, torch.where(inside, groups, steps), v)[..., :steps]


def fill_values(x: Tensor, groups: Tensor, steps: int, baseline: Any, mode: str, *,
                generator: torch.Generator | None = None, low: float = 0.0, high: float = 1.0) -> Tensor:
    """The value ``(B, K, steps)`` given to the features of each step, as Quantus' perturbation functions choose it.

    'black', 'white', a number: one value per image (replacing by the minimum keeps the minimum, so the cumulative
    loop's value never changes). 'mean': the mean of the image as it is when the step starts, i.e. for
    cumulative perturbation the running mean after the earlier steps' replacements (Quantus recomputes it from
    the perturbed array each step): ``m_{t+1} = m_t + n_t (m_t - xbar_t) / F`` with ``n_t`` the step's feature
    count and ``xbar_t`` the step's mean of x. 'uniform': one draw from U(low, high) per image, class and step
    (``generator``), as Quantus draws one value per sample per call.
    """
    b, k, f = groups.shape
    if baseline == "uniform":
        u = torch.rand((b, k, steps), generator=generator, dtype=torch.float64,
                       device=x.device if generator is None else generator.device)
        return (low + (high - low) * u).to(x.device)
    if baseline != "mean" or mode != "cumulative":
        v = baseline_value(x.to(torch.float64), baseline)
        return v.view(b, 1, 1).expand(b, k, steps)
    flat = x.to(torch.float64).flatten(1)
    counts = group_sums(flat.new_ones((b, 1, f)), groups, steps)  # (B, K, T)
    sums = group_sums(flat.unsqueeze(1), groups, steps)
    # m_{t+1} = alpha_t m_t - beta_t with alpha_t = 1 + n_t / F, beta_t = sum_t(x) / F: unrolled with the running
    # product P_t = prod_{i<t} alpha_i as m_t = P_t (m_0 - sum_{j<t} beta_j / P_{j+1}); alpha_t >= 1 keeps it stable.
    alpha, beta = 1 + counts / f, sums / f
    p_next = alpha.cumprod(dim=-1)  # P_{t+1}
    p = torch.cat([p_next.new_ones((b, k, 1)), p_next[..., :-1]], dim=-1)
    acc = torch.cat([beta.new_zeros((b, k, 1)), (beta / p_next).cumsum(dim=-1)[..., :-1]], dim=-1)
    return p * (flat.mean(dim=1).view(b, 1, 1) - acc)


def trapezoid(curve: Tensor) -> Tensor:
    """``np.trapz(curve, dx=1)`` over the last dimension: Quantus' ``calculate_auc``."""
    return (curve[..., 1:] + curve[..., :-1]).sum(dim=-1) / 2 if curve.shape[-1] > 1 else curve.new_zeros(
        curve.shape[:-1])
