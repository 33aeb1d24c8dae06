"""The one place that calls ``torch.func.vjp`` and ``vmap``.

For B images and K classes: one ``extract`` forward, one ``vjp`` of the head at the features, and the vjp
function vmapped over the K one-hot cotangents ``(K, B, num_classes)``. A per-class ``reduce(g, A)`` turns
each class's gradient into a map inside the vmap, so the caller gets ``(B, K, h, w)`` maps and never the
``(K, B, C, h, w)`` gradient (``chunk_size`` bounds how much of it exists at once).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.utils._pytree as _pytree
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from funcam._src import guard as _guard
from funcam._src.base import CAM, Features, Split, as_features
from funcam._src.core import request
from funcam._src.core.request import DEFAULT_MAX_MEMORY, Request, auto_chunk_size
from funcam._src.core.rules import Rule, channel_sum

__all__ = ["DEFAULT_MAX_MEMORY", "auto_chunk_size", "class_hvp", "class_indices", "class_maps", "class_vjp",
           "jacobian_pays", "logits_of", "logits_or_output", "resolve_classes", "sample_chunks", "sample_scores",
           "sampled_class_vjp"]


def resolve_classes(classes: Any, top_k: int | None, logits: Tensor) -> Tensor:
    """Class indices ``(B, K)`` from ``classes`` ((K,), (B, K), int, list) or the top-k of ``logits (B, N)``: the
    same checks as ``funcam.cam`` (``request.parse`` then ``request.resolve``), for callers without a Request."""
    return request.resolve(request.parse(classes=classes, top_k=top_k), logits)


def class_maps(split: Split, x: Tensor, req: Request, rule: Rule) -> CAM:
    """Maps ``rule.per_class(dlogit_k/dA, A)`` for every image and requested class (``req``; see ``funcam.cam``).

    rule.weights: when the rule's map is ``sum_c w_c A_c``, its ``(g, A) -> w (B, C)``: the maps then come from
        one batched product outside the vmap.
    rule.pooled: the same rule for a spatially constant gradient, ``(v (B, K, C), A) -> (B, K, h, w)``;
    used when ``split.pooled`` says the head starts with global average pooling (the exact fast path).
    rule.mean: the rule's channel weights are the spatial mean of the gradient (Grad-CAM): with fewer channels
    than classes they come from the head's Jacobian in a shift added at every position, C forward-mode passes
    instead of K reverse ones (``_shift_jacobian_maps``); not when ``chunk_size`` asks for the per-class path.
    """
    score_fn = req.score_fn
    feats, rebuild = as_features(split.extract(x))
    maps = feats.maps
    # a static Pooled is a function of the map alone (no context); a graph route's lookup binds the context itself
    pooled = split.pooled(feats) if callable(split.pooled) else None if feats.context else split.pooled
    if pooled is not None and rule.pooled is not None and len(maps) == 1 and maps[0].ndim == 4:
        return _pooled_maps(pooled, maps[0], req, rule.pooled, split.layers, split.module)
    if rule.mean and req.chunk_size is None and len(maps) == 1 and maps[0].ndim == 4:
        out = _shift_jacobian_maps(split, feats, rebuild, req)
        if out is not None:
            return out
    # A chained head recomputes maps[1:] from maps[0]; feeding them detached keeps outer autograd from
    # counting their dependence on x and the parameters twice (``.detach`` stops every level).
    primals = (maps[0],) + tuple(m.detach() for m in maps[1:]) if feats.chained else maps

    def scores(*ms: Tensor) -> tuple[Tensor, Any]:
        out = split.head(rebuild(ms))
        if score_fn is not None:
            return score_fn(out), logits_or_output(out)
        logits = logits_of(out)
        return logits, logits

    out, vjp_fn, logits = torch.func.vjp(scores, *primals, has_aux=True)
    idx, picked = class_indices(out, logits, req, x.shape[0])
    b, k = idx.shape
    if k == 0:
        empty = tuple(m.new_zeros((b, 0) + tuple(m.shape[2:])) for m in maps)
        return CAM(empty[0] if len(empty) == 1 else empty, picked, logits)
    cot = _one_hot(idx, out.shape[1], out.dtype)
    # the (B, C, h, w) gradient per map, and about as much again for the products the rules form
    chunk_size = req.chunk(sum(4 * m.numel() * m.element_size() for m in maps), k)
    per_class = rule.weights if rule.weights is not None else rule.per_class

    def per_class_maps(ct: Tensor) -> tuple[Tensor, ...]:
        grads = vjp_fn(ct)
        # and the gradient's largest magnitude: an exactly zero gradient for every class is worth a warning
        return tuple(per_class(g, a) for g, a in zip(grads, maps)) + (
            torch.stack([g.detach().abs().amax() for g in grads]).amax(),)

    *per, reached = _vmap_chunks(per_class_maps, cot, chunk_size, maps)
    _guard.check_reached(reached, split.layers, split.module)
    if rule.weights is not None:
        result = tuple(channel_sum(w.movedim(0, 1), a) for w, a in zip(per, maps))
    else:
        result = tuple(p.movedim(0, 1) for p in per)
    return CAM(result[0] if len(result) == 1 else result, picked, logits)


def _vmap_chunks(fn: Callable[[Tensor], Any], cot: Tensor, chunk_size: int | None, primals: tuple,
                 randomness: str = "error", checkpointed: bool = True) -> Any:
    """``vmap(fn)(cot)`` over the K cotangents ``cot (K, ...)``, ``chunk_size`` at a time.

    Differentiable results (grad mode on): each chunk's per-class backward would stay in the autograd graph until
    the results die, K classes' worth at once. Checkpointing each chunk (also a single one: all K in one chunk
    would keep K backwards) keeps only its inputs and results and recomputes its backward when they are
    differentiated, so max_memory bounds this case too. ``randomness``:
    vmap's, for an ``fn`` that runs a forward (dropout of a model in training mode): ``"same"`` for every class.
    checkpointed=False: for an ``fn`` that runs ``torch.func`` transforms itself, which refuse to run inside a
    checkpoint (its saved-tensor hooks); its chunks' backwards stay alive with the results in grad mode."""
    k = cot.shape[0]
    if k and checkpointed and _keeps_graph(primals):
        parts = [checkpoint(torch.func.vmap(fn, chunk_size=chunk_size, randomness=randomness), ct,
                            use_reentrant=False) for ct in cot.split(chunk_size or k)]
        if isinstance(parts[0], Tensor):
            return torch.cat(parts, dim=0)
        return tuple(torch.cat(p, dim=0) for p in zip(*parts))
    return torch.func.vmap(fn, chunk_size=chunk_size, randomness=randomness)(cot)


def jacobian_pays(k: int, c: int, shifted: bool) -> bool:
    """Whether K classes cost more by K reverse passes of the head than by c forward passes in the shift (c: the
    number of directions, min(C, hw)). Without a shifted head each of the c passes costs about one reverse pass:
    K > c. A shifted head's C passes together cost about a forward, so the route pays from a few dozen classes:
    measured crossovers at B = 8 (224 px) were K = 20-30 on vit_small CLS-pooled (C = 384), 5-10 average-pooled,
    20-25 on swin_tiny (C = 768), about 50 on timm vgg16's ConvMlp head (C = 512): K > C / 16, within about 1.3x of
    the better route on each; never for one class."""
    return k > (max(c // 16, 1) if shifted else c)


def _load_jvp_rules() -> None:
    """torch's forward-mode rules for the composite ops that have none of their own (``torch.autograd.forward_ad``
    loads them the same way); their import warns of a deprecation, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def _shift_jacobian_maps(split: Split, feats: Features, rebuild: Callable, req: Request) -> CAM | None:
    """Grad-CAM for many classes from min(C, hw) forward-mode passes (None when the per-class vjp is cheaper).

    Grad-CAM's weight w_kc = mean_hw d s_k / dA_chw is (1 / hw) d s_k / d t_c for a shift t (B, C) added at every
    position of A (Selvaraju et al. 2017, eq. 1; the chain rule through the broadcast): the K x C Jacobian of the
    scores in t, here one column per channel by ``jvp``, vmapped over the C unit shifts. ``split.shifted`` gives a
    head whose forward mode in t is cheap (the ViT routes); otherwise ``head(A + t)``. With fewer positions than
    channels the map itself is taken instead: sum_c w_kc A_cp = (1 / hw) d s_k / d t along t = A[:, :, p], one jvp
    per position p (a CLIP tower's 7x7 grid: 49 passes for 2048 channels and any number of prompts).
    """
    a = feats.maps[0]
    b, c, h, w = a.shape
    n_dir = min(c, h * w)
    known = req.known_k
    score_fn = req.score_fn
    if known is not None and not jacobian_pays(known, n_dir, split.shifted is not None):
        return None  # decided before any head forward: the per-class path costs nothing more at small K
    if isinstance(split.module, torch.nn.Module) and any(m.training for m in split.module.modules()):
        return None  # dropout inside the vmap over directions would draw one mask per direction: a wrong Jacobian
    if torch.compiler.is_compiling():
        # torch 2.14 cannot trace jvp through layer_norm inside vmap (an internal assert on _fw_primal with fake
        # tensors), which every ViT head has: compiled callers take the per-class path, which traces everywhere
        return None
    _load_jvp_rules()

    def shifted(t: Tensor) -> Any:
        if split.shifted is not None:
            return split.shifted(feats, t)
        return split.head(rebuild((a + t[:, :, None, None],)))

    def scores(t: Tensor) -> tuple[Tensor, Any]:
        out = shifted(t)
        if score_fn is not None:
            return score_fn(out), logits_or_output(out)
        logits = logits_of(out)
        return logits, logits

    t0 = a.new_zeros(b, c)
    out, logits = scores(t0)
    idx, picked = class_indices(out, logits, req, b)
    k = idx.shape[1]
    if k == 0 or not jacobian_pays(k, n_dir, split.shifted is not None):
        return None
    # per direction: the tangent of the map (B, C, h, w) and as much again inside the head, at most
    per_dir = (b * c if split.shifted is not None else 2 * a.numel()) * a.element_size() * 4
    chunk = auto_chunk_size(per_dir, n_dir, req.max_memory)
    at_positions = h * w < c
    if at_positions:
        # each image's feature vector at position p, and one random shift: the maps alone cannot tell a zero
        # gradient (refused below, as on every route) from features orthogonal to it
        probe = torch.randn((1, b, c), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        dirs = torch.cat([rearrange(a, "b c h w -> (h w) b c"), probe.to(a)])
    else:
        dirs = torch.eye(c, dtype=a.dtype, device=a.device).unsqueeze(1).expand(c, b, c)  # (C, B, C) unit shifts
    jac = torch.func.vmap(lambda u: torch.func.jvp(lambda t: scores(t)[0], (t0,), (u,))[1], chunk_size=chunk)(dirs)
    jac = jac.permute(1, 2, 0)  # (B, N, directions): d s_n / d t along each direction
    if at_positions:
        _guard.check_reached(jac[..., -1].detach().abs().amax(dim=0), split.layers, split.module)
        jac = jac[..., :-1]
    else:
        _guard.check_reached(jac.detach().abs().amax(dim=(0, 2)), split.layers, split.module)
    wts = jac if score_fn is not None else jac.gather(1, idx.unsqueeze(-1).expand(-1, -1, jac.shape[-1]))
    if at_positions:
        return CAM(rearrange(wts / (h * w), "b k (h w) -> b k h w", h=h, w=w), picked, logits)
    return CAM(channel_sum(wts / (h * w), a), picked, logits)


def _keeps_graph(maps: tuple[Tensor, ...]) -> bool:
    """Whether the maps will carry an autograd graph (grad mode on, and x or the parameters require grad)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
        isinstance(m, Tensor) and m.requires_grad for m in maps)  # a score callable's output: any object


def logits_of(out: Any) -> Tensor:
    """The ``(B, num_classes)`` logits in a model's output: the output itself, or its ``logits`` field (a Hugging
    Face ``ModelOutput``). Anything else (a dict, a tuple, an embedding, a dense map) needs a score callable."""
    t = getattr(out, "logits", None) if not isinstance(out, Tensor) else out
    if isinstance(t, Tensor) and t.ndim == 2:
        return t
    what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
    if isinstance(out, dict):
        what += f" with keys {list(out)}"
    hint = " (a model in training mode can return a tuple: call model.eval() first)" if isinstance(out, tuple) else ""
    raise ValueError(
        f"the model returns {what}, not logits (B, num_classes), so integer classes do not say what to explain"
        f"{hint}: pass classes= as a callable that takes the model's output and returns (B, K) scores, e.g. "
        f"classes=lambda out: out['out'][:, [c]].mean((2, 3)) for a segmentation model or "
        f"classes=lambda emb: emb @ refs.T for an embedding model")


def logits_or_output(out: Any) -> Any:
    """What ``CAM.logits`` reports: the logits when the output has them, else the model's output as it is."""
    t = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    return t if isinstance(t, Tensor) and t.ndim == 2 else out


def class_vjp(forward: Callable[..., tuple[Tensor, Any]], primals: tuple[Tensor, ...], req: Request,
              reduce: Callable[[tuple[Tensor, ...], Any], Tensor], *, empty: Callable[[int], Tensor],
              per_class_bytes: int) -> CAM:
    """``reduce(d score_k / d primals, aux)`` for every requested class k in one vjp vmapped over one-hot cotangents.

    For explanations whose inputs are not feature maps (attention relevance, input gradients, relevance rules).
    forward(*primals) -> (model output, aux). reduce(grads, aux) -> per-class map (B, ...), run under vmap.
    empty(B) -> (B, 0, ...) for K == 0. Returns CAM(maps (B, K, ...), classes (B, K) or None, logits).
    per_class_bytes: the caller's estimate of what one vmapped class holds (its gradients at the primals, the
    backward's per-class activation gradients, reduce's temporaries); the classes run in chunks of
    ``req.chunk(per_class_bytes, K)``.
    """
    score_fn = req.score_fn

    def scores(*p: Tensor) -> tuple[Tensor, tuple[Any, Any]]:
        out, aux = forward(*p)
        if score_fn is not None:
            return score_fn(out), (logits_or_output(out), aux)
        logits = logits_of(out)
        return logits, (logits, aux)

    out, vjp_fn, (logits, aux) = torch.func.vjp(scores, *primals, has_aux=True)
    idx, picked = class_indices(out, logits, req, None)
    if idx.shape[1] == 0:
        return CAM(empty(idx.shape[0]), picked, logits)
    cot = _one_hot(idx, out.shape[1], out.dtype)
    per = _vmap_chunks(lambda ct: reduce(vjp_fn(ct), aux), cot, req.chunk(per_class_bytes, cot.shape[0]),
                       primals + (logits,))  # (K, B, ...)
    return CAM(per.movedim(0, 1), picked, logits)


def sampled_class_vjp(forward: Callable[[Tensor], Any], x: Tensor, req: Request,
                      reduce: Callable[..., Tensor], *, empty: Callable[[int], Tensor], sample_bytes: int,
                      class_bytes: int, samples: tuple[Tensor, ...] | None = None,
                      point: Callable[..., Tensor] | None = None) -> CAM:
    """``sum_s reduce(d score_k / d x_s, *samples[s])`` for every requested class k and S points ``x_s`` near x.

    The input-gradient attributions that average or integrate over perturbed copies of x (SmoothGrad, Integrated
    Gradients, GradientShap) need K x S backward passes. Here the S points of a chunk of samples are one forward of
    s * B images, and that forward's one vjp is vmapped over the K one-hot cotangents: the forward is shared by the
    K classes, every backward by the s * B images. Chunked under ``max_memory`` over both axes.

    forward(inp (n, C, H, W)) -> the model's output. x: (B, C, H, W); the classes are resolved, and the logits
        reported, at x (one forward of B images), and a ``classes`` callable scores each sample's (B, ...) output.
    samples: per-sample tensors, each with S leading (Integrated Gradients' alphas and step sizes, SmoothGrad's
        noise (S, B, C, H, W)); point(x, *chunk) -> (s, B, C, H, W) the chunk's points. None: the one point x
        itself (its forward also gives the logits).
    reduce(g (s, B, C, H, W), *chunk) -> the chunk's part (B, ...) of the sum, run under vmap over the classes.
    sample_bytes: what one image's forward keeps for its vjp; class_bytes: what one class of one image's vmapped
        backward holds (``sample_chunks`` plans the chunks from both).
    empty(B) -> (B, 0, ...) for K == 0.
    Returns CAM(maps (B, K, ...) the sums, classes (B, K) or None for a callable, logits (B, N) at x).

    Differentiable maps (grad mode, with x or the parameters requiring grad) keep every chunk's forward, S * B
    images' activations, until they are freed (``torch.func.vjp`` cannot run inside a checkpoint, which would
    recompute it); each chunk's backwards are checkpointed. Under ``torch.no_grad()`` (as ``funcam.explain``
    runs) one chunk exists at a time, within ``max_memory``.
    """
    b = x.shape[0]
    score_fn = req.score_fn

    def scores(inp: Tensor, s: int) -> tuple[Tensor, Any]:
        return sample_scores(forward(inp), s, b, req)

    def attribute(total: Tensor | None, forward_at: Callable[[Tensor], tuple], inp: Tensor, s: int, chunk: tuple,
                  idx: Tensor | None, k_step: Callable[[int], int | None]) -> tuple[Tensor, Tensor, Any]:
        """One forward of the chunk's s * B points ``inp``, its vjp vmapped over the K classes chunk by chunk, each
        chunk's (k, B, ...) part added into ``total`` (K, B, ...), made at the first chunk: no (K, ...) result
        exists twice, and the (k, s * B, N) cotangents only per chunk. (idx None: the classes come from this
        forward's logits.) Returns (total, idx, the forward's aux)."""
        out, vjp_fn, aux = torch.func.vjp(forward_at, inp, has_aux=True)
        if idx is None:
            idx = class_indices(out, aux, req, b)[0]
        k = idx.shape[1]
        step = k_step(k) or max(k, 1)  # K == 0: no chunk runs
        # with a graph kept, each chunk's K backwards would stay alive until the maps die: checkpointed instead
        keep = _keeps_graph((inp, out))
        for k0 in range(0, k, step):
            cot = _one_hot(idx[:, k0:k0 + step], out.shape[1], out.dtype).repeat(1, s, 1)  # rows sample-major
            per = torch.func.vmap(lambda ct: reduce(vjp_fn(ct)[0].unflatten(0, (s, b)), *chunk))
            part = checkpoint(per, cot, use_reentrant=False) if keep else per(cot)
            if total is None:
                total = part.new_zeros((k,) + tuple(part.shape[1:]))
            total[k0:k0 + step] += part
        return total, idx, aux

    if samples is None:
        # the one point x: its forward gives the classes and logits, and its vjp serves every class; the forward is
        # the model's own, so only the per-class backwards count against max_memory, as for class_vjp
        total, idx, logits = attribute(None, lambda p: scores(p, 1), x, 1, (), None,
                                       lambda k: req.chunk(b * class_bytes, k))
        picked = idx if score_fn is None else None
        if idx.shape[1] == 0:
            return CAM(empty(b), picked, logits)
        return CAM(total.movedim(0, 1), picked, logits)

    # the classes (top_k, range checks) and logits at x itself, not at a perturbed point
    out, logits = sample_scores(forward(x), 1, b, req)
    idx, picked = class_indices(out, logits, req, b)
    if idx.shape[1] == 0:
        return CAM(empty(b), picked, logits)
    n = samples[0].shape[0]
    s_step, k_step = sample_chunks(b, n, idx.shape[1], sample_bytes, class_bytes, req)
    total = None
    for lo in range(0, n, s_step):
        chunk = tuple(t[lo:lo + s_step] for t in samples)
        pts = point(x, *chunk)
        s = pts.shape[0]
        total = attribute(total, lambda p, s=s: scores(p, s), pts.flatten(0, 1), s, chunk, idx, lambda k: k_step)[0]
    return CAM(total.movedim(0, 1), picked, logits)


def sample_scores(out: Any, s: int, b: int, req: Request) -> tuple[Tensor, Any]:
    """(scores, logits or output) of a model's output for s * B images, s samples of the B images (sample-major):
    its logits (s * B, N), or the ``classes`` callable's scores (s * B, K), each sample's B images scored on their
    own (a callable may hold per-image targets (B, ...))."""
    score_fn = req.score_fn
    if score_fn is None:
        logits = logits_of(out)
        return logits, logits
    parts = [score_fn(_pytree.tree_map(lambda t, i=i: t[i * b:(i + 1) * b] if isinstance(t, Tensor) else t, out))
             for i in range(s)]
    return torch.cat(parts), logits_or_output(out)


def sample_chunks(b: int, n: int, k: int, sample_bytes: int, class_bytes: int,
                  req: Request) -> tuple[int, int | None]:
    """(samples per forward, classes per vmapped chunk or None for all) for B images, S = ``n`` samples and K = ``k``
    classes, so that a chunk's s * B * (sample_bytes + k * class_bytes) stays within ``max_memory`` (``chunk_size``
    classes when given).

    The forward work is S * B images however the samples are chunked, and the backward work K * S * B: only the
    batch sizes change. For a given number s * k of backward images at once, s = 1 costs the least memory, so
    all K classes at once are tried first with as many samples as fit, else one sample with as many classes."""
    budget = DEFAULT_MAX_MEMORY if req.max_memory is None else req.max_memory
    if req.chunk_size is not None:
        kk = min(req.chunk_size, k)
        return max(1, min(n, budget // max(1, b * (sample_bytes + kk * class_bytes)))), req.chunk_size
    s = budget // max(1, b * (sample_bytes + k * class_bytes))
    if s >= 1:
        return min(n, s), None
    return 1, auto_chunk_size(b * class_bytes, k, max(1, budget - b * sample_bytes))


def class_indices(out: Tensor, logits: Tensor, req: Request, b: int | None) -> tuple[Tensor, Tensor | None]:
    """(idx (B, K) of the columns of ``out`` to explain, class indices to report or None)."""
    if req.score_fn is None:
        idx = request.resolve(req, logits)
        return idx, idx
    if not isinstance(out, Tensor) or out.ndim != 2 or (b is not None and out.shape[0] != b):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise ValueError(f"the classes callable must return scores (B, K) = ({'B' if b is None else b}, K), got {got}")
    return torch.arange(out.shape[1], device=out.device).expand(out.shape[0], -1), None


def _one_hot(idx: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """idx (B, K) -> one-hot cotangents (K, B, n), by comparison: no data-dependent shapes under compile."""
    return (idx.T.unsqueeze(-1) == torch.arange(n, device=idx.device)).to(dtype)


def _pooled_maps(pooled: Any, a: Tensor, req: Request, pooled_reduce: Callable, layers: Any = (),
                 module: Any = None) -> CAM:
    """The exact fast path for heads that start with global average pooling (``funcam.Pooled``).

    With z = mean_hw A (B, C), d logit_k / dA = (d logit_k / dz) / (h w) at every position. For class
    indices and a final Linear, d logit_k / d(pre-logits) is the weight row W[k] (no (K, B, N) x (N, D)
    product), pulled back through ``pre_logits`` by one vmapped vjp on (B, C) tensors.
    """
    b, c, h, w = a.shape
    z = a.mean(dim=(2, 3))
    clf = pooled.classifier
    score_fn = req.score_fn
    if clf is not None and score_fn is None:
        pre, vjp_fn = torch.func.vjp(pooled.pre_logits, z)
        logits = clf(pre)
        idx = request.resolve(req, logits)
        picked = idx
        cot = clf.weight[idx].movedim(1, 0)  # (K, B, D): the vjp of a Linear at a one-hot cotangent
    else:
        def scores(zz: Tensor) -> tuple[Tensor, Tensor]:
            p = pooled.pre_logits(zz)
            lg = clf(p) if clf is not None else p
            return (score_fn(lg) if score_fn else lg), lg

        out, vjp_fn, logits = torch.func.vjp(scores, z, has_aux=True)
        idx, picked = class_indices(out, logits, req, b)
        cot = _one_hot(idx, out.shape[1], out.dtype)
    k = idx.shape[1]
    if k == 0:
        return CAM(a.new_zeros((b, 0, h, w)), picked, logits)
    # per class: its cotangent and gradient at z, the rule's same-sized temporaries on (B, C) (Grad-CAM++'s closed
    # form holds about six at once) and its (B, h, w) map
    chunk_size = req.chunk((2 * b * cot.shape[-1] + 8 * b * c + b * h * w) * a.element_size(), k)
    # Chunk by chunk of classes: the (k, B, C) gradients at z from one vmapped vjp of the small pooled head,
    # then the chunk's maps from one batched product, so only one chunk's temporaries exist at once.
    step = k if chunk_size is None else chunk_size
    parts = []
    reached = []
    for ct in cot.split(step, dim=0):
        (gz,) = torch.func.vmap(vjp_fn, chunk_size=step)(ct)
        reached.append(gz.detach().abs().amax())
        parts.append(pooled_reduce(gz.movedim(0, 1) / (h * w), a))
    _guard.check_reached(torch.stack(reached), layers, module)
    return CAM(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), picked, logits)


def class_hvp(split: Split, x: Tensor, req: Request, reduce: Callable[[Tensor, Tensor, Tensor], Tensor]) -> CAM:
    """``reduce(g, Hv, A)`` for every requested class, with second derivatives of the score at the split's features.

    g = d s_k / dA and Hv = (d^2 s_k / dA^2) A, the Hessian of the class's score in the features applied to the
    features themselves, both ``(B, C, h, w)``: forward-mode differentiation (``jvp``, tangent A) of the head's
    vjp at the one-hot cotangent, vmapped over the K classes in chunks bounded by ``max_memory``. Only the head after
    the cut is differentiated twice. reduce -> per-class result ``(B, ...)``; returns ``CAM((K, B, ...) moved to
    (B, K, ...), classes, logits)``. One feature map (ValueError otherwise).
    """
    score_fn = req.score_fn
    feats, rebuild = as_features(split.extract(x))
    if len(feats.maps) != 1 or feats.maps[0].ndim != 4:
        raise ValueError(f"second derivatives are taken at a split at one layer, got one at {list(split.layers)}")
    a = feats.maps[0]

    def scores(m: Tensor) -> tuple[Tensor, Any]:
        out = split.head(rebuild((m,)))
        if score_fn is not None:
            return score_fn(out), logits_or_output(out)
        logits = logits_of(out)
        return logits, logits

    out, logits = scores(a)
    idx, picked = class_indices(out, logits, req, x.shape[0])
    b, k = idx.shape
    if k == 0:
        return CAM(a.new_zeros((b, 0) + tuple(a.shape[2:])), picked, logits)
    cot = _one_hot(idx, out.shape[1], out.dtype)
    _load_jvp_rules()

    def per_class(ct: Tensor) -> Tensor:
        def grad_at(m: Tensor) -> Tensor:
            return torch.func.vjp(lambda mm: scores(mm)[0], m)[1](ct)[0]

        g, hv = torch.func.jvp(grad_at, (a,), (a,))
        return reduce(g, hv, a)

    # the gradient and its tangent (B, C, h, w) per class, and as much again of the head's own per-class tensors
    chunk = req.chunk(8 * a.numel() * a.element_size(), k)
    # each class runs the head's forward again: a head in training mode draws the same dropout for every class;
    # per_class runs torch.func.vjp and jvp, which cannot run inside a checkpoint
    return CAM(_vmap_chunks(per_class, cot, chunk, (a,), randomness="same", checkpointed=False).movedim(0, 1),
               picked, logits)
