"""What every public entry point checks and promises, in one place (eager mode only).

* ``x``: a floating ``(B, C, H, W)`` tensor with the model's parameter dtype and no NaN or Inf (a map of a
  non-finite input means nothing; a silent NaN map is worse than an error).
* The outputs: logits and maps finite, else ``FloatingPointError`` naming the images (a finite input that
  overflows, e.g. float16 activations beyond 65504).
* A model with dropout, drop-path or batch norm in training mode: ``TrainingModeWarning`` (they make the
  maps random). Batch norm normalises with batch statistics as in training but does not update its running
  statistics (``track_running_stats`` is off for the call and restored), and every buffer of a training
  module is restored afterwards: the model is bit-identical after the call. Calls from several threads share
  this per submodule under a lock, with a count: the first call to enter saves the buffers and switches the
  statistics off, the last to leave restores them (so a model in training mode stays untouched under threads
  too; a training forward the caller runs in another thread meanwhile does not update the statistics).
* ``torch.inference_mode()``: the gradient transforms need autograd, so funcam leaves inference mode for its
  own computation and clones an inference-mode ``x`` into a normal tensor.

Under ``torch.compile`` none of this runs (each check would be a graph break or a host sync): inputs are
the caller's responsibility there, and non-finite values propagate into the maps.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


def unwrap(model: Any) -> Any:
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (any other value as is).

    funcam differentiates the model's own forward on ``x``'s device; the wrappers only scatter a batch over
    devices (and synchronise gradients in training), which a function transform must not go through.
    """
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


class TrainingModeWarning(UserWarning):
    """The model (or one of its submodules) is in training mode: dropout and batch statistics make maps random."""


def module_dtype(module: nn.Module | None) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (or buffer), None when it has none."""
    if module is None:
        return None
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def check_input(x: Any, in_chans: int | None = None, module: nn.Module | None = None) -> None:
    """Raise TypeError/ValueError naming ``x`` unless it is a finite floating (B, C, H, W) tensor that fits."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)} ({x.ndim} dims)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if in_chans is not None and x.shape[1] != in_chans:
        raise ValueError(f"x must have {in_chans} channels for this model, got shape {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        return
    want = module_dtype(module)
    if want is not None and x.dtype != want and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {want}: convert one of them, "
                        f"e.g. x.to({want}) (funcam supports float32, float64, bfloat16 and float16 models)")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        images = bad.flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"x contains NaN or Inf ({int(bad.sum())} values, in images {_first(images)}); "
                         f"the maps of a non-finite input are undefined")


def check_output(out: Any) -> None:
    """Raise FloatingPointError naming the images whose logits or maps (B, K, ...) are not finite.

    out: what an entry point returns: a ``CAM`` (its logits and maps), a tensor or a tuple / list of them."""
    if torch.compiler.is_compiling():
        return
    for what, t in _named_tensors(out, "maps"):
        if t.numel() and t.ndim >= 1 and t.is_floating_point():
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                images = bad.reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
                raise FloatingPointError(
                    f"the model produced non-finite {what} for images {_first(images)} from a finite x "
                    f"(dtype {t.dtype}); float16 overflows above 65504: run the model in float32 or bfloat16")


def _named_tensors(out: Any, what: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(out, Tensor):
        yield what, out
    elif hasattr(out, "_fields") and "logits" in out._fields and "maps" in out._fields:  # CAM
        yield from _named_tensors(out.logits, "logits")
        yield from _named_tensors(out.maps, "maps")
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _named_tensors(o, what)


def zero_weights_hint(model: nn.Module | None) -> str:
    """A sentence naming the model's all-zero weight tensors (matrices and kernels first: an all-zero bias is
    usual), for errors about a gradient that is exactly zero; empty when there are none."""
    if not isinstance(model, nn.Module):
        return ""
    # a bias adds and never blocks a gradient: an all-zero one is usual and no suspect
    zero = [(p.ndim < 2, n) for n, p in model.named_parameters()
            if p.numel() > 1 and not n.endswith("bias") and not bool(p.detach().any())]
    if not zero:
        return ""
    names = [n for _, n in sorted(zero)]
    more = ", ..." if len(names) > 3 else ""
    return (f". {len(names)} parameter tensors are all zero ({', '.join(names[:3])}{more}):"
            f" libraries zero-initialise some layers (classifier heads, layer scales, post-norms), so an untrained "
            f"model can have no gradient at all; load trained weights")


class ZeroMapWarning(UserWarning):
    """Every requested map is exactly zero because the gradient of every score w.r.t. the features is zero on this
    input: the right answer for this input, and a sign of a wrong cut if it holds for every input."""


def check_reached(amax: Tensor, layers: Any, module: nn.Module | None) -> None:
    """Warn (``ZeroMapWarning``) when the gradient of every explained score w.r.t. the features is exactly zero
    (``amax``: its largest absolute value per class): every map is zero. On one input that is the answer (a ReLU
    network whose units are all off for this image); refusing it would refuse a right map, so it is a warning, and
    the structural case (a cut the output never depends on) is refused where it can be told: at the first-use
    check of a split."""
    if torch.compiler.is_compiling() or amax.numel() == 0 or bool((amax != 0).any()):
        return
    where = f" at {list(layers)}" if layers else ""
    warnings.warn(f"the gradient of every requested score w.r.t. the features{where} is exactly zero on this input, "
                  f"so every map is zero: right if the scores do not depend on the features for this input; if they "
                  f"never do (a cut after the last token mixing of a CLS-pooled transformer, a score that ignores "
                  f"the model, zero weights after the cut), cut elsewhere{zero_weights_hint(module)}",
                  ZeroMapWarning, stacklevel=3)


def _first(items: list[int], n: int = 8) -> str:
    return str(items[:n])[:-1] + (", ...]" if len(items) > n else "]")


def _random_in_training(m: nn.Module) -> bool:
    """Whether ``m`` computes differently in training mode: dropout, drop-path, batch norm."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if getattr(m, "track_running_stats", False) is True:
        return True
    p = getattr(m, "drop_prob", None)  # timm's DropPath / DropBlock
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        return True
    p = getattr(m, "p", None)  # torchvision's StochasticDepth, other dropout-like modules with a drop rate p
    return isinstance(p, float) and p > 0 and next(m.parameters(recurse=False), None) is None


# ids of the modules whose guard is active in this thread / task: an entry point built on others (Guided
# Grad-CAM runs guided backprop and Grad-CAM) guards the model once, so it warns once and restores once.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("funcam_guarded", default=frozenset())


@contextlib.contextmanager
def _guard(module: nn.Module | None) -> Iterator[None]:
    active = _ACTIVE.get()
    if isinstance(module, nn.Module) and id(module) in active:
        yield  # the outer call's guard already covers this model
        return
    token = _ACTIVE.set(active | {id(module)}) if isinstance(module, nn.Module) else None
    try:
        with _guard_once(module):
            yield
    finally:
        if token is not None:
            _ACTIVE.reset(token)


class _Held:
    """One submodule under guard, shared by every call (any thread) that guards it: ``count`` calls inside;
    its buffers as the first of them found them; whether it tracked running statistics before."""

    def __init__(self, module: nn.Module, random: bool):
        self.module, self.random, self.count = module, random, 0
        self.saved = [(b, b.detach().clone()) for b in module.buffers(recurse=False)]
        self.tracking = getattr(module, "track_running_stats", False) is True


# id(submodule) -> _Held while at least one call guards it; read and changed under _LOCK only. Per submodule,
# not per model: a Split's FX GraphModule and the model it came from share their batch-norm layers.
_HELD: dict[int, _Held] = {}
_LOCK = threading.Lock()


def _enter(module: nn.Module) -> tuple[list[_Held], nn.Module | None]:
    """Hold every training submodule with buffers or random behaviour; returns them and the first random one."""
    with _LOCK:
        training = [m for m in module.modules() if m.training]
        # a batch-norm layer another call holds has track_running_stats off just now: it is still random
        random = [m for m in training if (_HELD[id(m)].random if id(m) in _HELD else _random_in_training(m))]
        if not random:
            return [], None
        held = []
        for m in training:
            h = _HELD.get(id(m))
            if h is None:
                if not (_random_in_training(m) or next(m.buffers(recurse=False), None) is not None):
                    continue
                h = _HELD[id(m)] = _Held(m, _random_in_training(m))
                # Batch norm in training mode normalises with batch statistics and updates its running ones in
                # place; the update would be lost anyway (restored below) and is refused inside torch.func
                # transforms ("mutate a captured Tensor"), so the running statistics are switched off.
                if h.tracking:
                    m.track_running_stats = False
            h.count += 1
            held.append(h)
        return held, random[0]


def _leave(held: list[_Held]) -> None:
    """Release ``held``; the last call to leave a submodule restores its flag and its buffers."""
    with _LOCK:
        for h in held:
            h.count -= 1
            if h.count:
                continue
            del _HELD[id(h.module)]
            if h.tracking:
                h.module.track_running_stats = True
            with torch.no_grad():
                for b, value in h.saved:
                    b.copy_(value)


@contextlib.contextmanager
def _guard_once(module: nn.Module | None) -> Iterator[None]:
    held, random = _enter(module) if isinstance(module, nn.Module) else ([], None)
    try:
        if random is not None:
            warnings.warn(f"{type(module).__name__} has modules in training mode ({type(random).__name__}, ...): "
                          f"dropout and batch statistics make the maps random; call model.eval() first",
                          TrainingModeWarning, stacklevel=2)  # one source line: Python's default filter shows it once
        leave = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if leave else contextlib.nullcontext():
            yield
    finally:
        _leave(held)


def one_image(x: Tensor, classes: Any) -> tuple[Tensor, Any]:
    """For B = 0: one zero image (and per-image classes for it) to run instead; some models (timm ViTs with
    dynamic image sizes) cannot run an empty batch, and the result's shapes need one forward anyway."""
    if isinstance(classes, Tensor) and classes.ndim == 2:
        classes = classes.new_zeros((1, classes.shape[1]))
    return x.new_zeros((1,) + tuple(x.shape[1:])), classes


def no_images(out: Any) -> Any:
    """A result (``CAM``, tensor, or tuple/list of them) for one image, cut to zero images."""
    if isinstance(out, Tensor):
        return out[:0]
    if hasattr(out, "_replace"):  # CAM
        return out._replace(maps=no_images(out.maps), classes=None if out.classes is None else out.classes[:0],
                            logits=out.logits[:0])
    return type(out)(no_images(o) for o in out)


def normal_tensor(x: Any) -> Any:
    """An inference-mode tensor cloned into a normal one (autograd cannot save inference tensors); else ``x``."""
    if isinstance(x, Tensor) and not torch.compiler.is_compiling() and x.is_inference():
        with torch.inference_mode(False):
            return x.clone()
    return x


def run(module: nn.Module | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` with the training-mode and inference-mode handling above; plain ``fn()`` under compile."""
    if torch.compiler.is_compiling():
        return fn()
    with _guard(module):
        return fn()


def _module_of(target: Any) -> nn.Module | None:
    """The model behind an entry point's first argument: a ``Split``'s module, a model (DataParallel unwrapped)."""
    target = getattr(target, "module", None) if hasattr(target, "extract") else unwrap(target)
    return target if isinstance(target, nn.Module) else None


def entry(*, in_chans: Callable[[Any], int | None] = lambda target: None, checks: bool = True,
          empty_batch: bool = True) -> Callable[[Callable], Callable]:
    """Decorate a public entry point ``fn(model_or_split, x, ...)`` with everything this module promises.

    In this order: ``x`` checked (``check_input``, with ``in_chans(model_or_split)`` channels); an empty batch
    (B = 0) run as one zero image (with ``classes`` of shape (1, K) when it was (0, K)) and cut back to zero
    images; inference-mode ``x`` and ``classes`` made normal tensors; the call run under the training-mode /
    inference-mode handling (``run``) for the model behind the first argument; its result checked for
    non-finite logits and maps (``check_output``). ``checks=False`` keeps only the normal tensors and the
    model handling (for functions with checks of their own, e.g. the metrics); ``empty_batch=False`` calls
    ``fn`` with B = 0 as it is. Under ``torch.compile`` the call goes straight to ``fn``.
    """

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        takes_classes = "classes" in sig.parameters
        x_name = list(sig.parameters)[1]

        @functools.wraps(fn)
        def wrapper(target: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return fn(target, x, *args, **kwargs)
            module = _module_of(target)
            if checks:
                check_input(x, in_chans(target), module)
            bound = sig.bind(target, x, *args, **kwargs)
            if checks and empty_batch and x.shape[0] == 0:
                x1, classes1 = one_image(x, bound.arguments.get("classes"))
                if takes_classes:
                    bound.arguments["classes"] = classes1
                bound.arguments[x_name] = x1
                return no_images(wrapper(*bound.args, **bound.kwargs))
            bound.arguments[x_name] = normal_tensor(x)
            if takes_classes:
                bound.arguments["classes"] = normal_tensor(bound.arguments.get("classes"))
            out = run(module, lambda: fn(*bound.args, **bound.kwargs))
            if checks:
                check_output(out)
            return out

        return wrapper

    return decorate
