"""Per-call options, read and checked once at the entry into one ``Request`` that every layer below receives.

``funcam.cam(model, x, classes, method=..., top_k=..., relu=..., chunk_size=..., max_memory=..., **options)``
parses its arguments with ``parse`` before any forward: what ``classes`` and ``top_k`` ask for, how many classes
are vmapped at once, and the method's own options (``n_steps``, ``aug_smooth``, ...), each checked against the
method's ``Option`` specs. Only the range of class indices waits for the model's output (``resolve``).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

# Bytes of per-class tensors alive at once when chunk_size is automatic: the general path's (B, C, h, w)
# gradients, the fast path's (B, C) gradients and the rule's temporaries. Chunks this small stay closer to the
# caches, and ran fastest on both paths (benchmarks/memory.py; the numbers are in benchmarks/README.md).
DEFAULT_MAX_MEMORY = 128 * 2**20


class Option(NamedTuple):
    """A method's own keyword option.

    name: the keyword (``n_steps``); the command line spells it ``--n-steps``. default: its value when not given.
    check: ``value -> value``, raising ValueError / TypeError that names the option, the value and what it expects.
    help: one line for docstrings and ``--help``. cli: how the command line reads it (an argparse ``type``), or
    None when it is not a command-line option (tensors, generators, callables).
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    cli: Callable[[str], Any] | None = None


class Request(NamedTuple):
    """What one call asks for, checked.

    classes: None (the ``top_k`` predicted classes), a LongTensor ``(K,)`` shared by the batch or ``(B, K)`` per
        image (ints and lists arrive here as ``(K,)``), or a callable ``output -> scores (B, K)``.
    top_k: how many predicted classes when ``classes`` is None (None: 1).
    chunk_size: classes per vmapped chunk, or None to choose it from ``max_memory``.
    max_memory: bytes of per-class tensors at once when ``chunk_size`` is None (None: ``DEFAULT_MAX_MEMORY``).
    options: the method's own options, every one present (defaults filled in).
    """

    classes: Any = None
    top_k: int | None = None
    chunk_size: int | None = None
    max_memory: int | None = None
    options: dict = {}

    @property
    def score_fn(self) -> Callable | None:
        """The score callable, when ``classes`` is one."""
        return self.classes if callable(self.classes) else None

    @property
    def known_k(self) -> int | None:
        """How many classes are asked for, when that is known before the forward (None for a callable)."""
        if self.score_fn is not None:
            return None
        if self.classes is None:
            return 1 if self.top_k is None else self.top_k
        return self.classes.shape[-1]

    def chunk(self, per_class_bytes: int, k: int) -> int | None:
        """Classes per vmapped chunk: ``chunk_size`` when given, else as many as ``max_memory`` holds at
        ``per_class_bytes`` each; None when all ``k`` fit at once."""
        if self.chunk_size is not None:
            return self.chunk_size
        return auto_chunk_size(per_class_bytes, k, self.max_memory)

    def with_classes(self, classes: Any) -> Request:
        """The same request for other classes (``top_k`` dropped): how a method explains exactly the classes
        another part of the same call resolved."""
        return self._replace(classes=classes, top_k=None)


def auto_chunk_size(per_class_bytes: int, k: int, max_memory: int | None) -> int | None:
    """Classes per vmapped chunk so that about ``max_memory`` bytes of per-class tensors exist at once.

    None (no chunking) when all ``k`` classes fit. The estimate counts the gradient at the maps and a few
    same-sized temporaries; it bounds what funcam allocates, not what the model's own vjp needs.
    """
    check_max_memory(max_memory)
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    chunk = max(1, budget // max(1, per_class_bytes))
    return None if chunk >= k else chunk


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_max_memory(max_memory: Any) -> None:
    if max_memory is not None and (not _is_int(max_memory) or max_memory < 1):
        raise ValueError(f"max_memory must be None or a positive number of bytes, got {max_memory!r}")


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def check_classes(classes: Any) -> Any:
    """``classes`` as the engine takes it: None, a callable, or an integer tensor ``(K,)`` / ``(B, K)``."""
    if classes is None or callable(classes):
        return classes
    if _is_int(classes):
        classes = [classes]
    if isinstance(classes, (list, tuple)):
        if not all(_is_int(c) for c in classes):
            raise TypeError(f"classes must be integers, got {classes!r}")
        if classes and not -2**63 <= min(classes) <= max(classes) < 2**63:  # torch.tensor would overflow
            raise ValueError(f"classes must lie in [0, N) (N: the model's classes), got values from "
                             f"{min(classes)} to {max(classes)}")
        return torch.tensor(classes, dtype=torch.long).reshape(-1)
    if not isinstance(classes, Tensor):
        raise TypeError(f"classes must be an int, a list of ints, a LongTensor (K,) or (B, K), or a callable "
                        f"output -> (B, K) scores; got {type(classes).__name__}")
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise TypeError(f"classes must be an integer tensor, got dtype {classes.dtype}")
    if classes.ndim not in (1, 2):
        raise ValueError(f"classes must have shape (K,) or (B, K), got shape {tuple(classes.shape)}")
    return classes


def check_top_k(top_k: Any) -> int | None:
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    return top_k


def parse(specs: tuple[Option, ...] = (), *, classes: Any = None, top_k: Any = None, chunk_size: Any = None,
          max_memory: Any = None, method: str = "", **options: Any) -> Request:
    """Check every per-call argument once and return the ``Request``; ``specs``: the method's own options
    (``method`` names it in the message for an option it does not take)."""
    check_chunk_size(chunk_size)
    check_max_memory(max_memory)
    if classes is not None and top_k is not None:
        raise ValueError("give either classes= or top_k=, not both" if not callable(classes)
                         else "top_k does not apply when classes is a callable")
    known = {o.name: o for o in specs}
    unknown = [k for k in options if k not in known]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(known), n=1)
        takes = f"its options are {', '.join(known)}" if known else "it takes no options of its own"
        raise TypeError(f"method {method!r} has no option {unknown[0]!r} ({takes})"
                        + (f"; did you mean {near[0]!r}?" if near else ""))
    opts = {o.name: (o.check(options[o.name]) if o.name in options else o.default) for o in specs}
    return Request(check_classes(classes), check_top_k(top_k), chunk_size, max_memory, opts)


def resolve(req: Request, logits: Tensor) -> Tensor:
    """Class indices ``(B, K)`` for the request, from its classes or the top-k of ``logits (B, N)``; raises for an
    index outside [0, N) or a top_k above N."""
    b, n = logits.shape
    classes = req.classes
    if classes is None:
        k = 1 if req.top_k is None else req.top_k
        if k > n:
            raise ValueError(f"top_k must be an int in [1, {n}] (the number of classes), got {req.top_k!r}")
        return logits.detach().topk(k, dim=1).indices
    if classes.ndim == 1:
        classes = classes.unsqueeze(0).expand(b, -1)
    elif classes.shape[0] != b:
        raise ValueError(f"classes must have shape (K,) or (B, K) = ({b}, K), got shape {tuple(classes.shape)}")
    classes = classes.to(device=logits.device, dtype=torch.long)
    if not torch.compiler.is_compiling() and classes.numel():
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"classes must lie in [0, {n}) (the model has {n} classes), got values from {lo} to {hi}")
    return classes


# --- checks for options (each names the option) ------------------------------------------------------------------

def positive_int(name: str) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        return v
    return check


def non_negative_float(name: str) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        return float(v)
    return check


def one_of(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v
    return check


def flag(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
        return v
    return check


def generator_or_none(name: str) -> Callable[[Any], torch.Generator | None]:
    def check(v: Any) -> torch.Generator | None:
        if v is not None and not isinstance(v, torch.Generator):
            raise TypeError(f"{name} must be a torch.Generator or None, got {type(v).__name__}")
        return v
    return check
