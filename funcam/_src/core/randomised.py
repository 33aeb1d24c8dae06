"""Randomised copies of a model's parameters, for the randomisation sanity checks (Adebayo et al. 2018, "Sanity
checks for saliency maps", NeurIPS, Sec. 3.1), evaluated through ``torch.func.functional_call``: the user's model
is never copied or changed, only its parameters (and buffers) are swapped for the call.

A layer is what Quantus randomises: every submodule with a ``reset_parameters`` method, in ``named_modules()``
order. Randomising it is its ``reset_parameters()`` under ``torch.manual_seed(seed + 1)`` (Quantus seeds every
layer alike), run on a copy of that one layer inside ``torch.random.fork_rng`` (the global generator is left as it
was). A state is a dict ``name -> tensor`` of the parameters and buffers that differ from the model's.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from funcam._src.core.engine import auto_chunk_size

__all__ = ["LAYER_ORDERS", "randomisable_layers", "randomised_states", "call_with", "randomised_outputs"]

LAYER_ORDERS = ("top_down", "bottom_up", "independent")


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule with ``reset_parameters``, in ``named_modules()`` order (Quantus')."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module to randomise its layers, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "reset_parameters")]


def _reset(name: str, module: nn.Module, seed: int) -> dict[str, Tensor]:
    """The state of ``module`` after ``reset_parameters()`` under ``seed``, keyed by full names."""
    devices = [t.device for t in module.parameters() if t.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        fresh = copy.deepcopy(module)
        fresh.reset_parameters()
    prefix = f"{name}." if name else ""
    return {prefix + n: t.detach() for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers())}


def randomised_states(model: nn.Module, *, layer_order: str = "top_down", seed: int = 42) -> Iterator[
        tuple[str, dict[str, Tensor]]]:
    """``(layer name, state)`` for each step of Quantus' ``get_random_layer_generator``: 'top_down' randomises the
    layers cumulatively from the output (cascading randomisation, Adebayo et al. Sec. 3.1), 'bottom_up' from the
    input, 'independent' one layer at a time. A state shares the tensors of earlier steps (no copies)."""
    if layer_order not in LAYER_ORDERS:
        raise ValueError(f"layer_order must be one of {LAYER_ORDERS}, got {layer_order!r}")
    layers = randomisable_layers(model)
    if layer_order == "top_down":
        layers = layers[::-1]
    state: dict[str, Tensor] = {}
    for name, module in layers:
        fresh = _reset(name, module, seed + 1)
        state = fresh if layer_order == "independent" else {**state, **fresh}
        yield name, state


class _Bound(nn.Module):
    """Holds the user's model as a child so that ``functional_call`` can swap its parameters around any callable."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def call_with(model: nn.Module, state: dict[str, Tensor], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(model, *args)`` with the parameters and buffers in ``state`` in place of the model's, through
    ``torch.func.functional_call`` (restored afterwards, also on error)."""
    return torch.func.functional_call(_Bound(model), {f"model.{k}": v for k, v in state.items()}, (fn,) + args,
                                      strict=False)


def stacked(model: nn.Module, states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``(S, ...)`` stacks of every tensor any of the S states changes (the model's own where a state does not)."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    keys = sorted({k for s in states for k in s})
    return {k: torch.stack([s.get(k, own[k]).detach() for s in states]) for k in keys}


def randomised_outputs(model: nn.Module, x: Tensor, *, layer_order: str = "top_down", seed: int = 42,
                       max_memory: int | None = None) -> tuple[list[str], Tensor]:
    """Layer names and the outputs ``(L, B, N)`` of the L randomised models of ``randomised_states`` on ``x``.

    The states are stacked and the model runs once per chunk of them under ``torch.func.vmap`` over
    ``functional_call`` (chunks of about ``max_memory`` bytes of stacked tensors); no model copy is made.
    """
    names, states = zip(*[(n, s) for n, s in randomised_states(model, layer_order=layer_order, seed=seed)])
    union = {k: t for s in states for k, t in s.items()}
    per = max(1, sum(t.numel() * t.element_size() for t in union.values()))
    chunk = auto_chunk_size(per, len(states), max_memory) or len(states)

    def run(params: dict[str, Tensor], xs: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (xs,), strict=False)

    out = []
    with torch.no_grad():
        for i in range(0, len(states), chunk):
            part = stacked(model, list(states[i:i + chunk]))
            # x batched too (an expanded view, no copy): every activation then carries the state dimension, which
            # in-place updates of an activation by a batched one (residual ``x += shortcut``) need
            xs = x.unsqueeze(0).expand((len(states[i:i + chunk]),) + tuple(x.shape))
            out.append(torch.func.vmap(run)(part, xs))
    return list(names), torch.cat(out)
