"""Randomisation sanity checks, Quantus 0.6's definitions batched over B images x K classes: the random-logit test
and the model parameter randomisation tests (MPRT, smooth MPRT, efficient MPRT).

A method that reads the model gives different maps for another class and for a model whose layers were reset; a
model-free map (edges, a centre prior) does not change. Each explanation is recomputed by ``explain_fn(model, x,
classes) -> maps`` (default funcam's Grad-CAM) for all B images and K classes in one call; the randomised models
are the states of ``funcam._src.core.randomised``, run through ``torch.func.functional_call``, and with
``vmap=True`` (an ``explain_fn`` without data-dependent Python branches) all states of a chunk in one vmap.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from funcam._src import guard as _guard
from funcam._src.core import evaluation as ev
from funcam._src.core.complexity import discrete_entropy
from funcam._src.core.engine import auto_chunk_size
from funcam._src.core.randomised import call_with, randomised_states, stacked
from funcam._src.core.recompute import EXPLAIN_BYTES_PER_INPUT_BYTE, check_explainer, explain_copies
from funcam._src.core.similarity import similarity_function

__all__ = ["random_logit", "MPRT", "mprt", "smooth_mprt", "efficient_mprt"]


@_guard.entry(checks=False)
def random_logit(model: Callable, x: Tensor, maps: Tensor, classes: Any, *, similarity_func: Any = "ssim",
                 num_classes: int | None = None, off_classes: Tensor | None = None, abs: bool = False,
                 normalise: bool = True, explain_fn: Callable | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Random logit test (Sixt et al. 2020, "When explanations lie", ICML, Sec. 5): ``(B, K)`` the similarity of
    each map to the map of a random other class (default SSIM of the flattened maps, as Quantus). Lower is
    better: a map that does not change with the class ignores it.

    off_classes: ``(B, K)`` the other classes; default uniform over the ``num_classes`` (default: all the model's)
    classes but the explained one (``generator``), as Quantus draws ``randint(0, num_classes - 1)`` and skips it.
    """
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise)
    with torch.no_grad():
        n = model(x[:1]).shape[-1] if num_classes is None else num_classes
    if off_classes is None:
        dev = x.device if generator is None else generator.device
        draw = torch.randint(0, n - 1, tuple(st.classes.shape), generator=generator, device=dev).to(x.device)
        off_classes = draw + (draw >= st.classes).long()
    off = off_classes.to(x.device).long()
    if off.shape != st.classes.shape or bool((off == st.classes).any()):
        raise ValueError(f"off_classes must be (B, K) = {tuple(st.classes.shape)} classes other than the explained "
                         f"ones, got {tuple(off.shape)}")
    other = ev.attributions(check_explainer(explain_fn)(model, x, off).detach(), x, abs=abs, normalise=normalise)
    return similarity_function(similarity_func)(st.a.flatten(2), other.flatten(2)).to(x.dtype)


class MPRT(NamedTuple):
    """scores: ``(B, K, 1 + L)`` the similarity of each map to the map of the original model (first) and of each of
    the L randomised models; layers: ``("original", name_1, ..., name_L)``."""
    scores: Tensor
    layers: tuple


def _layer_maps(model: nn.Module, x: Tensor, classes: Tensor, explain_fn: Callable, layer_order: str, seed: int,
                skip_layers: bool, vmap: bool, max_memory: int | None, prepare: Callable[[Tensor], Tensor]
                ) -> tuple[list[str], list[Tensor]]:
    """Names and attributions ``(B, K, ...)`` (``prepare``-d) of the original and each randomised model."""
    steps = list(randomised_states(model, layer_order=layer_order, seed=seed))
    if skip_layers:
        steps = steps[-1:]
    names = ["original"] + [n for n, _ in steps]
    states = [{}] + [s for _, s in steps]
    if not vmap:
        return names, [prepare(call_with(model, s, explain_fn, x, classes)) for s in states]
    per = sum(t.numel() * t.element_size() for t in states[-1].values()) + \
        EXPLAIN_BYTES_PER_INPUT_BYTE * x.numel() * x.element_size()
    chunk = auto_chunk_size(per, len(states), max_memory) or len(states)
    out: list[Tensor] = []
    for i in range(0, len(states), chunk):
        part = states[i:i + chunk]
        xs = x.unsqueeze(0).expand((len(part),) + tuple(x.shape))
        maps = torch.func.vmap(lambda p, xi: call_with(model, p, explain_fn, xi, classes))(stacked(model, part), xs)
        out.extend(prepare(m) for m in maps.unbind(0))
    return names, out


@_guard.entry(checks=False)
def mprt(model: nn.Module, x: Tensor, maps: Tensor, classes: Any, *, similarity_func: Any = "spearman",
         layer_order: str = "top_down", seed: int = 42, return_average_correlation: bool = False,
         return_last_correlation: bool = False, skip_layers: bool = False, abs: bool = True, normalise: bool = True,
         explain_fn: Callable | None = None, vmap: bool = False, max_memory: int | None = None) -> MPRT | Tensor:
    """Model parameter randomisation test (Adebayo et al. 2018, NeurIPS, Sec. 3.1; cascading from the top layer by
    default): the rank correlation of each map with the map of the model whose layers are randomised one more at
    a time. A model-reading method falls towards 0; a model-free map stays at 1.

    Returns ``MPRT(scores (B, K, 1 + L), layers)``; ``return_last_correlation``: ``(B, K)`` the fully randomised
    model's; ``return_average_correlation``: ``(B, K)`` the mean over all ``1 + L`` columns (the "original" one
    included, as Quantus 0.6's mean skips a key "orig" that its dict names "original"). ``skip_layers``: only the
    last randomised model. ``vmap``: run the randomised models of a chunk in one ``torch.func.vmap`` (needs an
    ``explain_fn`` made of torch.func transforms, e.g. a ``torch.func.grad`` saliency; funcam's Grad-CAM checks
    its inputs in Python and is run in a loop).
    """
    if return_average_correlation and (return_last_correlation or skip_layers):
        raise ValueError("return_average_correlation needs every layer: not with return_last_correlation or "
                         "skip_layers")
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=normalise)
    sim = similarity_function(similarity_func)
    fn = check_explainer(explain_fn)
    names, layer_a = _layer_maps(model, x, st.classes, fn, layer_order, seed, skip_layers, vmap, max_memory,
                                 lambda m: ev.attributions(m.detach(), x, abs=abs, normalise=normalise))
    scores = torch.stack([sim(st.a.flatten(2), a.flatten(2)) for a in layer_a], dim=-1).to(x.dtype)
    if return_last_correlation:
        return scores[..., -1]
    if return_average_correlation:
        return scores.mean(dim=-1)
    return MPRT(scores, tuple(names))


def second_moment_normalised(a: Tensor) -> Tensor:
    """a ``(B, K, ...)`` divided per map by ``sqrt(mean(a^2))`` (Binder et al. 2022; Quantus'
    ``normalise_by_average_second_moment_estimate`` on one pair, the default of the smooth and efficient MPRT);
    an all-zero map stays zero."""
    scale = a.flatten(2).pow(2).mean(dim=-1).sqrt().view(a.shape[:2] + (1,) * (a.ndim - 2))
    return torch.where(scale > 0, a / torch.where(scale > 0, scale, 1.0), a)


@_guard.entry(checks=False)
def smooth_mprt(model: nn.Module, x: Tensor, maps: Tensor, classes: Any, *, similarity_func: Any = "spearman",
                layer_order: str = "bottom_up", seed: int = 42, nr_samples: int = 50, noise_magnitude: float = 0.1,
                return_average_correlation: bool = False, return_last_correlation: bool = False,
                skip_layers: bool = False, abs: bool = True, normalise: bool = True, explain_fn: Callable | None = None,
                draws: Tensor | None = None, generator: torch.Generator | None = None,
                max_memory: int | None = None) -> MPRT | Tensor:
    """Smooth MPRT (Hedström et al. 2023, "Sanity checks revisited", Sec. 4.1): ``mprt`` with every explanation the
    mean over ``nr_samples`` noisy copies ``x + e`` (``e ~ N(0, s^2)``, ``s = noise_magnitude * (max(x) - min(x))``
    per image; the last copy noise-free, as Quantus), normalised by the root mean square (``normalise``).
    Bottom-up randomisation by default. draws: ``(1 + L, nr_samples - 1, B, C, H, W)`` standard normal values
    (one set for the original and each randomised model, in that order; ``L = 1`` with ``skip_layers``).
    All copies of the B images go to ``explain_fn`` in one batch per model (chunked by ``max_memory``).
    """
    ev.positive_int(nr_samples, "nr_samples")
    if return_average_correlation and (return_last_correlation or skip_layers):
        raise ValueError("return_average_correlation needs every layer: not with return_last_correlation or "
                         "skip_layers")
    fn = check_explainer(explain_fn)
    st = ev.setup(model, x, maps, classes, abs=False, normalise=False)
    given = second_moment_normalised(st.a) if normalise else st.a
    given = given.abs() if abs else given
    n_models = 2 if skip_layers else 1 + sum(1 for _ in randomised_states(model, layer_order=layer_order, seed=seed))
    shape = (n_models, nr_samples - 1) + tuple(x.shape)
    if draws is None:
        dev = x.device if generator is None else generator.device
        draws = torch.randn(shape, generator=generator, dtype=torch.float64, device=dev)
    if tuple(draws.shape) != shape:
        raise ValueError(f"draws must have shape (1 + L, nr_samples - 1, B, C, H, W) = {shape}, got "
                         f"{tuple(draws.shape)}")
    spread = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).view(-1, 1, 1, 1) * noise_magnitude
    counter = iter(range(n_models))

    def smoothed(mod: nn.Module, xb: Tensor, cls: Tensor) -> Tensor:
        noise = draws[next(counter)].to(x.device, torch.float64) * spread
        copies = torch.cat([(xb.unsqueeze(0) + noise).to(x.dtype), xb.unsqueeze(0)])  # (S, B, C, H, W)
        a = explain_copies(fn, mod, copies, cls, abs=False, normalise=False, max_memory=max_memory).mean(dim=0)
        a = second_moment_normalised(a) if normalise else a
        return a.abs() if abs else a

    names, layer_a = _layer_maps(model, x, st.classes, smoothed, layer_order, seed, skip_layers, False, max_memory,
                                 lambda a: a)
    sim = similarity_function(similarity_func)
    scores = torch.stack([sim(given.flatten(2), a.flatten(2)) for a in layer_a], dim=-1).to(x.dtype)
    if return_last_correlation:
        return scores[..., -1]
    if return_average_correlation:
        return scores.mean(dim=-1)
    return MPRT(scores, tuple(names))


@_guard.entry(checks=False)
def efficient_mprt(model: nn.Module, x: Tensor, maps: Tensor, classes: Any = None, *, layer_order: str = "bottom_up",
                   seed: int = 42, n_bins: int = 100, abs: bool = False, normalise: bool = False,
                   explain_fn: Callable | None = None, max_memory: int | None = None) -> Tensor:
    """Efficient MPRT (Hedström et al. 2023, "Sanity checks revisited", Sec. 4.2): ``(B, K)`` the relative rise of
    the explanation's discrete entropy (``n_bins`` equal bins) from the original to the fully randomised model,
    ``(H(a_random) - H(a)) / H(a)``; both maps are recomputed by ``explain_fn`` (the given ``maps`` only fix the
    classes' count). Higher is better: randomising the model should make a model-reading map noisier.
    """
    ev.positive_int(n_bins, "n_bins")
    st = ev.setup(model, x, maps, classes, abs=abs, normalise=False)

    def prepare(m: Tensor) -> Tensor:
        a = ev.attributions(m.detach(), x, abs=False, normalise=False)
        a = second_moment_normalised(a) if normalise else a
        return a.abs() if abs else a

    _, (a0, a1) = _layer_maps(model, x, st.classes, check_explainer(explain_fn), layer_order, seed, True, False,
                              max_memory, prepare)
    h0, h1 = discrete_entropy(a0.flatten(2), n_bins), discrete_entropy(a1.flatten(2), n_bins)
    return ((h1 - h0) / h0).to(x.dtype)
