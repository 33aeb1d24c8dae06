"""Maps for a whole folder of images: streamed, written in shards, resumable, split across torch.distributed ranks.

``explain_dataset(DIR, OUT, model, config, method=..., top_k=...)`` decodes and preprocesses in a DataLoader,
computes ``(n, K, h, w)`` maps per batch with ``funcam.explain.explain`` and writes them as float16 shards
(layout in ``funcam._shards``). ``load_maps(OUT)`` reads them back lazily.

Sharding: the image list is sorted (relative POSIX paths), and shard ``s`` always holds images
``[s * shard_size, (s + 1) * shard_size)`` of that global list, whatever the number of processes. At start, rank 0
lists the images, checks the settings and finds the shards still to do; it broadcasts that plan and rank ``r``
of ``W`` takes the pending shards ``r, r + W, r + 2W, ...``. So no image is done twice or padded, a restart
with another world size still recognises every finished shard, and the remaining work is balanced again.
Batches never cross a shard, so a batch holds the same images whatever the world size.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import posixpath
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from tqdm import tqdm

from funcam._src.app import shards as _shards
from funcam._src.app.explain import check_method, default_method, explain, method_of, validate
from funcam._src.core.cams import target_for
from funcam._src.core.request import check_chunk_size, check_max_memory
from funcam._src.app.files import append_text, write_text
from funcam._src.app.shards import DatasetError, FORMATS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".avif")


class RunSummary(NamedTuple):
    """images: in the dataset; errors: unreadable images (on rank 0: of the whole dataset; elsewhere: this
    rank's); written / skipped: shards done by this call (all ranks) / found already complete; seconds: this
    call's wall time on this rank."""
    images: int
    errors: int
    written: int
    skipped: int
    seconds: float


class MapShard(NamedTuple):
    """Maps of ``n`` images read back from one shard: ``paths (n)``, ``maps (n, K, h, w) float16``,
    ``classes (n, K) int64``, ``logits (n, N) float32``."""
    paths: tuple[str, ...]
    maps: Tensor
    classes: Tensor
    logits: Tensor


def list_images(root: str, *, exclude: str | None = None) -> list[str]:
    """Image files under ``root`` (by suffix, recursively), as sorted relative POSIX paths; skips ``exclude`` and
    hidden names. Follows symbolic links to folders but walks each real folder once, so a link to a parent
    neither repeats images nor loops forever. Whatever matches the suffix is listed (a pipe or a folder-like
    name included): what cannot be read is refused later and recorded in ``errors.jsonl``."""
    if not os.path.isdir(root):
        raise DatasetError(f"images folder {root!r} is not a directory")
    skip = os.path.realpath(exclude) if exclude else None
    seen = {os.path.realpath(root)}
    found = []
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):  # sorted: which of two links to one folder is walked does not depend on the OS
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real != skip and real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        rel = os.path.relpath(dirpath, root)
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


class _Images(torch.utils.data.Dataset):
    """Item ``i`` -> ``(i, x (3, S, S) or None, reason or None)``: a bad file becomes a reason, never an exception."""

    def __init__(self, root: str, paths: Sequence[str], config: Any):
        self.root, self.paths, self.config = root, paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from funcam._src.app.images import ImageError, limit_aspect, read_image
        from funcam._src.app.models import preprocess

        path = os.path.join(self.root, self.paths[i])
        try:
            return i, preprocess([limit_aspect(read_image(path))], self.config)[0], None
        except ImageError as e:
            return i, None, e.reason if e.path == path else str(e)
        except Exception as e:  # noqa: BLE001 - one odd file must not stop a dataset run
            return i, None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _collate(items: list) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    """Stack the readable images ``(b, 3, S, S)``; carry the failures ``(index, reason)`` alongside."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, _, err in items if err is not None]
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None), errors


def _distributed(device: torch.device) -> tuple[int, int, bool]:
    """``(rank, world size, whether we initialised the group)``; under torchrun, join its process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    # a rank that finishes early waits at the final barrier for the slowest one: allow a long wait
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size(), True


def _broadcast(obj: Any, world: int, device: torch.device) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def explain_dataset(images: str | Sequence[str], out: str, model: nn.Module, config: Any, *,
                    root: str | None = None, method: str | None = None, classes: Any = None,
                    top_k: int | None = None, layer: str | list[str] | None = None, batch_size: int = 16,
                    num_workers: int = 0, shard_size: int = 256, format: str = "safetensors",
                    overlays: bool = False, chunk_size: int | None = None, max_memory: int | None = None,
                    progress: bool = True, model_name: str | None = None,
                    on_error: Callable[[str, str], None] | None = None) -> RunSummary:
    """Explain every image of a folder (or list) and write sharded maps to ``out``; see the module docstring.

    images: a folder (walked recursively for image suffixes) or a list of paths relative to ``root``.
    model / config: an eval-mode classifier on its device and its ``funcam.models.Preprocess``.
    method, classes, top_k, layer, chunk_size, max_memory: as in ``funcam.explain.explain``; ``classes="all"``
        explains every class (K = N). Every image gets the same K. chunk_size and max_memory only bound memory
        (chunked maps equal unchunked ones to float rounding), so, unlike shard_size, they are not settings: a
        restart may change them.
    shard_size: images per shard file; part of the settings (a restart must use the same value).
    format: "safetensors" (memory-mapped reads) or "npz". overlays: also write labelled PNGs
        ``OUT/overlays/<path>__<class>__<method>.png`` (``funcam._overlay``).
    model_name: recorded in the settings (the weights are recorded by their hash either way).
    on_error: called as ``on_error(path, reason)`` for each unreadable image as it is met (by the rank that
        met it); the errors are recorded in ``OUT/errors.jsonl`` either way.
    Runs as one process, or as one rank of a ``torchrun`` job (each rank calls this with the same arguments).

    Nothing is written before the arguments are checked: the method, layer, classes and top_k run once on a
    blank image (``funcam.explain.validate``), so a typo never leaves settings behind that the corrected
    command would then be refused for. Rank 0 holds a lock on ``out`` for the whole run; a second run on the
    same ``out`` raises ``DatasetError`` naming the process that holds it.
    Listed paths are normalised (``./x.png`` is ``x.png``) and each is explained once.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    for arg, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    # funcam.cam's own checks, here before settings.json is written (cam meets them only at the first batch)
    check_chunk_size(chunk_size)
    check_max_memory(max_memory)
    if classes is not None and top_k is not None:
        raise ValueError("give either classes= or top_k=, not both")
    method = check_method(method or default_method(model))
    if isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    elif classes is not None and not (isinstance(classes, str) and classes == "all"):
        classes = [int(c) for c in classes]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    # split once (a graph-route model is captured once per input size, not once per batch or check), then
    # everything the maps depend on, checked on one blank image before anything is written
    target = target_for(method_of(method), model, layer)
    n_out = validate(target, config.size, method=method)
    if classes == "all":
        classes = list(range(n_out))
    bad = [c for c in classes or () if not 0 <= c < n_out]
    if bad:
        raise ValueError(f"classes: class index {bad[0]} is out of range; the model has {n_out} classes "
                         f"(0..{n_out - 1})")
    if top_k is not None and top_k > n_out:
        raise ValueError(f"top_k must be between 1 and {n_out} (the number of classes), got {top_k}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    rank, world, own_group = _distributed(device)
    lock = None
    try:
        if isinstance(images, (str, os.PathLike)):
            root = os.fspath(images)
        root = root or "."
        settings = json.loads(json.dumps({
            "model": model_name, "weights_sha256": _shards.weights_hash(model), "method": method,
            "classes": classes, "top_k": top_k if classes is not None else (top_k or 1), "layer": layer,
            "preprocess": config._asdict(), "shard_size": shard_size, "format": format, "overlays": overlays}))
        plan, problem = None, None
        if rank == 0:
            try:
                paths = (list_images(root, exclude=out) if isinstance(images, (str, os.PathLike))
                         else normalise_paths(images, root))
                if not paths:
                    raise DatasetError("no images found (looked for files ending in " + ", ".join(IMAGE_SUFFIXES)
                                       + ")")
                os.makedirs(os.path.join(out, "shards"), exist_ok=True)
                lock = _shards.Lock(out)  # before the settings: a second run must not touch the first one's files
                plan = _prepare(out, paths, settings, world)
            except DatasetError as e:
                problem = str(e)
            except OSError as e:
                if world == 1:
                    raise
                problem = f"rank 0 cannot write {e.filename or out}: {e.strerror or type(e).__name__}"
        plan, problem = _broadcast((plan, problem), world, device)
        if problem:
            raise DatasetError(problem)
        if plan["settings"]["weights_sha256"] != settings["weights_sha256"]:
            raise DatasetError(f"rank {rank} has other model weights than rank 0: every rank must load the same model")
        paths, shash, sizes = plan["paths"], plan["hash"], plan["sizes"]
        mine = plan["pending"][rank::world]
        batches = [list(range(s * shard_size + b, min(s * shard_size + sizes[s], s * shard_size + b + batch_size)))
                   for s in mine for b in range(0, sizes[s], batch_size)]
        loader = torch.utils.data.DataLoader(_Images(root, paths, config), batch_sampler=batches,
                                             num_workers=num_workers, collate_fn=_collate)
        opts = dict(method=method, classes=classes, top_k=None if classes is not None else (top_k or 1),
                    chunk_size=chunk_size, max_memory=max_memory)
        bar = tqdm(total=sum(sizes[s] for s in mine), unit="img", disable=True if not progress or rank else None,
                   desc="explain" if world == 1 else f"rank 0 of {world}", smoothing=0.1)
        shard, rows, errors, errs_total = None, [], [], 0
        for idx, x, errs in loader:
            s = (idx or [i for i, _ in errs])[0] // shard_size
            if shard is not None and s != shard:
                raise RuntimeError("batches out of shard order")  # cannot happen: the sampler is ordered
            shard = s
            errors += [(paths[i], reason) for i, reason in errs]
            errs_total += len(errs)
            if on_error is not None and errs:
                with tqdm.external_write_mode(file=sys.stderr):  # the message on a line of its own, bar redrawn
                    for i, reason in errs:
                        on_error(paths[i], reason)
            if x is not None:
                with torch.no_grad():  # torch.func transforms still differentiate; no graph to the weights
                    cam = explain(target, x.to(device), **opts)
                rows.append((idx, x, cam.maps.to(torch.float16).cpu(), cam.classes.cpu(), cam.logits.float().cpu()))
            bar.update(len(idx) + len(errs))
            if sum(len(r[0]) for r in rows) + len(errors) == sizes[s]:
                _finish(out, s, format, rows, errors, paths, shash, config if overlays else None, rank, method,
                        model)
                shard, rows, errors = None, [], []
        bar.close()
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            errs_total = _merge(out, plan)
        return RunSummary(len(paths), errs_total, len(plan["pending"]), len(sizes) - len(plan["pending"]),
                          time.perf_counter() - t0)
    finally:
        if lock is not None:
            lock.release()
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def normalise_paths(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> list[str]:
    """Listed image paths (relative to ``root``) as sorted POSIX paths, each normalised and listed once:
    ``./x.png``, ``sub/../x.png`` and ``../DIR/x.png`` (leaving ``root`` and coming back in) are all ``x.png``;
    a path outside ``root`` (``../x.png``) stays a file of its own."""
    base = os.path.realpath(root) if root is not None else None
    out = set()
    for p in paths:
        rel = posixpath.normpath(os.fsdecode(p).replace(os.sep, "/"))
        if base is not None and rel.startswith("../"):
            back = os.path.relpath(os.path.normpath(os.path.join(base, rel)), base)
            if not back.startswith(".."):
                rel = posixpath.normpath(back.replace(os.sep, "/"))
        out.add(rel)
    return sorted(out)


def _prepare(out: str, paths: list[str], settings: dict, world: int) -> dict:
    """Rank 0, holding the lock on ``out``: write or check the settings, drop temporaries a killed run left,
    find the shards still to do."""
    import hashlib

    from funcam._src.base import __version__

    # surrogateescape: a file name that is not UTF-8 hashes as its bytes (a valid one as before)
    joined = "\n".join(paths).encode("utf-8", "surrogateescape")
    settings = dict(settings, images={"count": len(paths), "sha256": hashlib.sha256(joined).hexdigest()})
    _shards.check_settings(out, settings)
    _shards.clean_temporaries(out)
    size = settings["shard_size"]
    sizes = [min(size, len(paths) - s * size) for s in range(math.ceil(len(paths) / size))]
    shash = _shards.settings_hash(settings)
    done = _shards.done_shards(out, settings["format"], len(sizes), shash, sizes)
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world, "shards_done_before": len(done),
           "shards": len(sizes), "funcam": __version__, "torch": torch.__version__}
    append_text(os.path.join(out, "runs.jsonl"), json.dumps(run) + "\n")
    return {"paths": paths, "settings": settings, "hash": shash, "sizes": sizes,
            "pending": [s for s in range(len(sizes)) if s not in done]}


def _finish(out, s, fmt, rows, errors, paths, shash, config, rank, method, model) -> None:
    """Write shard ``s`` (overlays first, so a complete shard implies complete overlays)."""
    idx = [i for r in rows for i in r[0]]
    if rows:
        maps, cls, logits = (torch.cat([r[k] for r in rows]) for k in (2, 3, 4))
    else:
        maps, cls, logits = torch.zeros(0, 0, 0, 0, dtype=torch.float16), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
    if config is not None and rows:
        from funcam._src.app.overlay import write_overlays
        from funcam._src.app.models import class_names

        write_overlays(out, [paths[i] for i in idx], torch.cat([r[1] for r in rows]), maps, cls, logits, config,
                       method, class_names(model))
    meta = {"shard": s, "rank": rank, "settings": shash, "paths": [paths[i] for i in idx], "errors": errors}
    _shards.write_shard(os.path.join(out, "shards", _shards.shard_name(s, fmt)), fmt,
                        {"maps": maps, "classes": cls, "logits": logits, "index": torch.tensor(idx, dtype=torch.long)},
                        meta)


def _merge(out: str, plan: dict) -> int:
    """Rank 0 after the barrier: the manifest (one line per image, global order) and the errors file;
    returns the number of unreadable images."""
    settings, fmt = plan["settings"], plan["settings"]["format"]
    lines = [json.dumps({"funcam_dataset": 1, "settings": settings, "shards": len(plan["sizes"])})]
    bad = []
    for s in range(len(plan["sizes"])):
        path = os.path.join(out, "shards", _shards.shard_name(s, fmt))
        meta = _shards.read_meta(path)
        if meta is None or meta.get("settings") != plan["hash"]:
            raise DatasetError(f"shard {s} is missing from {out} (did a rank fail?); run the same command again "
                               f"to finish the remaining shards")
        t = _shards.read_rows(path, ("classes", "logits"), 0, len(meta["paths"]))
        probs = t["logits"].softmax(-1).gather(1, t["classes"]) if t["classes"].numel() else t["classes"].float()
        for r, p in enumerate(meta["paths"]):
            rec = {"path": p, "shard": s, "row": r}
            if settings["classes"] is None or len(settings["classes"]) <= 100:
                rec.update(classes=t["classes"][r].tolist(), probs=[round(v, 6) for v in probs[r].tolist()])
            lines.append(json.dumps(rec))
        for p, reason in meta["errors"]:
            lines.append(json.dumps({"path": p, "shard": s, "error": reason}))
            bad.append(json.dumps({"path": p, "error": reason}))
    write_text(os.path.join(out, "manifest.jsonl"), "\n".join(lines) + "\n", fsync=True)
    write_text(os.path.join(out, "errors.jsonl"), "".join(b + "\n" for b in bad), fsync=True)
    return len(bad)


def load_maps(out: str, *, paths: Sequence[str] | None = None, classes: Sequence[int] | None = None
              ) -> Iterator[MapShard]:
    """Iterate over the finished shards of ``out`` as ``MapShard`` chunks, reading lazily.

    paths: only these images (relative paths as in the manifest); a path with no maps raises ``KeyError``
        (with the recorded error when it failed to read).
    classes: only these classes, as columns in this order: ``maps (n, len(classes), h, w)``, NaN where an
        image's explained classes (e.g. its top-k) did not include that class.
    Safetensors shards are memory-mapped and only the needed rows are read; npz shards are read per array.
    """
    settings = _shards.load_settings(out)
    if settings is None:
        raise DatasetError(f"{out} is not a funcam dataset output (no settings.json)")
    folder = os.path.join(out, "shards")
    files = sorted(n for n in os.listdir(folder) if _shards.SHARD_RE.match(n)) if os.path.isdir(folder) else []
    metas = [(os.path.join(folder, n), m) for n in files if (m := _shards.read_meta(os.path.join(folder, n)))]
    if paths is not None:
        want = set(paths)
        found = {p for _, m in metas for p in m["paths"]}
        missing = [p for p in paths if p not in found]
        if missing:
            failed = {p: r for _, m in metas for p, r in m["errors"]}
            raise KeyError("no maps in " + out + " for " + "; ".join(
                f"{p!r} ({'unreadable: ' + failed[p] if p in failed else 'not in the finished shards'})"
                for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    want_c = None if classes is None else torch.tensor([int(c) for c in classes], dtype=torch.long)
    return _iter_maps(metas, None if paths is None else want, want_c)


def _iter_maps(metas, want, want_c) -> Iterator[MapShard]:
    for path, meta in metas:
        rows = [r for r, p in enumerate(meta["paths"]) if want is None or p in want]
        if not rows:
            continue
        t = _shards.read_rows(path, ("maps", "classes", "logits"), rows[0], rows[-1] + 1)
        sel = torch.tensor(rows) - rows[0]
        maps, cls, logits = t["maps"][sel], t["classes"][sel], t["logits"][sel]
        if want_c is not None:
            # (n, K, C): where each requested class sits among the image's K explained classes, if anywhere
            match = cls.unsqueeze(-1) == want_c
            pos = match.to(torch.uint8).argmax(1)
            maps = maps.gather(1, pos[..., None, None].expand(-1, -1, *maps.shape[2:]))
            maps = maps.masked_fill(~match.any(1)[..., None, None], float("nan"))
            cls = want_c.expand(len(rows), -1)
        yield MapShard(tuple(meta["paths"][r] for r in rows), maps, cls, logits)
