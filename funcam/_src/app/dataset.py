"""Maps for a whole folder of images: streamed, written in shards, resumable, split across torch.distributed ranks.

``explain_dataset(DIR, OUT, model, config, method=..., top_k=...)`` decodes and preprocesses in a DataLoader,
computes ``(n, K, h, w)`` maps per batch with ``funcam.explain.explain`` and writes them as float16 shards
(layout in ``funcam._src.app.shards``). ``load_maps(OUT)`` reads them back lazily.

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
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from funcam._src.app import shards as _shards
from funcam._src.app.explain import check_method, default_method, explain, method_of, validate
from funcam._src.app.files import append_text, write_text
from funcam._src.app.folder import IMAGE_SUFFIXES, Images, collate, list_images, normalise_paths
from funcam._src.app.models import class_names
from funcam._src.app.overlay import write_overlays
from funcam._src.app.shards import FORMATS, DatasetError
from funcam._src.base import __version__
from funcam._src.core.cams import target_for
from funcam._src.core.request import check_chunk_size, check_max_memory


class RunSummary(NamedTuple):
    """images: in the dataset; errors: unreadable images (on rank 0: of the whole dataset; elsewhere: this
    rank's); written / skipped: shards done by this call (all ranks) / found already complete; seconds: this
    call's wall time on this rank."""
    images: int
    errors: int
    written: int
    skipped: int
    seconds: float


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


class DatasetJob(NamedTuple):
    """What every image of a run is explained with, checked once (``prepare_dataset``): the method (command-line
    spelling), what it explains (a split made once: a graph-route model is captured once per input size, not per
    batch or check), the classes (a list, or None for ``top_k``), chunking, the method's own options, the cut's
    name for the settings, and the model's number of classes."""

    method: str
    target: Any
    classes: list[int] | None
    top_k: int | None
    chunk_size: int | None
    max_memory: int | None
    options: dict
    layer: Any
    n_classes: int

    def explain(self, x: Tensor) -> Any:
        """``funcam.explain.explain`` of a batch ``x (B, C, H, W)`` with this job's settings."""
        return explain(self.target, x, method=self.method, classes=self.classes,
                       top_k=None if self.classes is not None else self.top_k, chunk_size=self.chunk_size,
                       max_memory=self.max_memory, **self.options)


def prepare_dataset(model: nn.Module, config: Any, *, method: str | None = None, classes: Any = None,
                    top_k: int | None = None, layer: str | list[str] | None = None, chunk_size: int | None = None,
                    max_memory: int | None = None, **options: Any) -> DatasetJob:
    """Check a run's explanation settings and the model once, on one blank image
    (``funcam._src.app.explain.validate``), so a
    typo never leaves settings behind that the corrected command would then be refused for; returns the ``DatasetJob``.
    ``classes="all"`` explains every class (K = N). Raises ValueError / TypeError naming the argument."""
    # funcam.cam's own checks, before the blank image: chunk_size / max_memory only bound memory (chunked maps equal
    # unchunked ones to float rounding), so, unlike shard_size, they are not settings: a restart may change them
    check_chunk_size(chunk_size)
    check_max_memory(max_memory)
    if classes is not None and top_k is not None:
        raise ValueError("give either classes= or top_k=, not both")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    elif classes is not None and not (isinstance(classes, str) and classes == "all"):
        classes = [int(c) for c in classes]
    method = check_method(method or default_method(model))
    target = target_for(method_of(method), model, layer)
    n = validate(target, config.size, method=method, **options)
    if classes == "all":
        classes = list(range(n))
    bad = [c for c in classes or () if not 0 <= c < n]
    if bad:
        raise ValueError(f"classes: class index {bad[0]} is out of range; the model has {n} classes (0..{n - 1})")
    if top_k is not None and top_k > n:
        raise ValueError(f"top_k must be between 1 and {n} (the number of classes), got {top_k}")
    return DatasetJob(method, target, classes, top_k or (1 if classes is None else None), chunk_size, max_memory,
               dict(options), layer, n)


def explain_dataset(images: str | Sequence[str], out: str, model: nn.Module, config: Any, *,
                    job: DatasetJob | None = None, root: str | None = None, batch_size: int = 16, num_workers: int = 0,
                    shard_size: int = 256, format: str = "safetensors", overlays: bool = False,
                    progress: bool = True, model_name: str | None = None,
                    on_error: Callable[[str, str], None] | None = None, **explain_options: Any) -> RunSummary:
    """Explain every image of a folder (or list) and write sharded maps to ``out``; see the module docstring.

    images: a folder (walked recursively for image suffixes) or a list of paths relative to ``root``.
    model / config: an eval-mode classifier on its device and its ``funcam.models.Preprocess``.
    job: the explanation, checked (``prepare_dataset(model, config, ...)``); or give ``prepare_dataset``'s keywords here
        (``method``, ``classes`` - ``"all"`` for K = N -, ``top_k``, ``layer``, ``chunk_size``, ``max_memory`` and the
        method's options), as in ``funcam.explain.explain``. Every image gets the same K.
    shard_size: images per shard file; part of the settings (a restart must use the same value).
    format: "safetensors" (memory-mapped reads) or "npz". overlays: also write labelled PNGs
        ``OUT/overlays/<path>__<class>__<method>.png`` (``funcam._src.app.overlay``).
    model_name: recorded in the settings (the weights are recorded by their hash either way).
    on_error: called as ``on_error(path, reason)`` for each unreadable image as it is met (by the rank that
        met it); the errors are recorded in ``OUT/errors.jsonl`` either way.
    Runs as one process, or as one rank of a ``torchrun`` job (each rank calls this with the same arguments).

    Nothing is written before the arguments are checked. Rank 0 holds a lock on ``out`` for the whole run; a second
    run on the same ``out`` raises ``DatasetError`` naming the process that holds it. Listed paths are normalised
    (``./x.png`` is ``x.png``) and each is explained once.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    for arg, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if job is None:
        job = prepare_dataset(model, config, **explain_options)
    elif explain_options:
        raise ValueError(f"give the explanation either as job= or as keywords, not both "
                         f"(got {sorted(explain_options)})")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    rank, world, own_group = _distributed(device)
    lock = None
    try:
        root = os.fspath(images) if isinstance(images, (str, os.PathLike)) else (root or ".")
        settings = json.loads(json.dumps({
            "model": model_name, "weights_sha256": _shards.weights_hash(model), "method": job.method,
            "classes": job.classes, "top_k": job.top_k, "layer": job.layer, "preprocess": config._asdict(),
            "shard_size": shard_size, "format": format, "overlays": overlays}))
        if job.options:
            settings["options"] = json.loads(json.dumps(job.options, default=repr))
        plan, lock = _plan(images, root, out, settings, rank, world, device)
        mine = plan["pending"][rank::world]
        sizes = plan["sizes"]
        batches = [list(range(s * shard_size + b, min(s * shard_size + sizes[s], s * shard_size + b + batch_size)))
                   for s in mine for b in range(0, sizes[s], batch_size)]
        loader = torch.utils.data.DataLoader(Images(root, plan["paths"], config), batch_sampler=batches,
                                             num_workers=num_workers, collate_fn=collate)
        bar = tqdm(total=sum(sizes[s] for s in mine), unit="img", disable=True if not progress or rank else None,
                   desc="explain" if world == 1 else f"rank 0 of {world}", smoothing=0.1)
        written = _explain_shards(loader, job, plan, out, format, config if overlays else None, rank, model,
                                  device, shard_size, on_error, bar)
        bar.close()
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        errs_total = _merge(out, plan) if rank == 0 else written
        return RunSummary(len(plan["paths"]), errs_total, len(plan["pending"]), len(sizes) - len(plan["pending"]),
                          time.perf_counter() - t0)
    finally:
        if lock is not None:
            lock.release()
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _plan(images: Any, root: str, out: str, settings: dict, rank: int, world: int, device: torch.device
          ) -> tuple[dict, Any]:
    """Rank 0 lists the images, takes the lock on ``out`` and makes the plan (``_prepare``); every rank receives it.
    Returns (plan, the lock or None)."""
    plan, problem, lock = None, None, None
    if rank == 0:
        try:
            paths = (list_images(root, exclude=out) if isinstance(images, (str, os.PathLike))
                     else normalise_paths(images, root))
            if not paths:
                raise DatasetError("no images found (looked for files ending in " + ", ".join(IMAGE_SUFFIXES) + ")")
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
        if lock is not None:
            lock.release()
        raise DatasetError(problem)
    if plan["settings"]["weights_sha256"] != settings["weights_sha256"]:
        raise DatasetError(f"rank {rank} has other model weights than rank 0: every rank must load the same model")
    return plan, lock


def _explain_shards(loader: Any, job: DatasetJob, plan: dict, out: str, fmt: str, overlay_config: Any, rank: int,
                    model: nn.Module, device: torch.device, shard_size: int, on_error: Callable | None,
                    bar: Any) -> int:
    """Explain this rank's batches and write each shard as soon as its last image is done; returns the number of
    unreadable images this rank met."""
    paths, sizes = plan["paths"], plan["sizes"]
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
            cam = job.explain(x.to(device))
            rows.append((idx, x, cam.maps.to(torch.float16).cpu(), cam.classes.cpu(), cam.logits.float().cpu()))
        bar.update(len(idx) + len(errs))
        if sum(len(r[0]) for r in rows) + len(errors) == sizes[s]:
            _finish(out, s, fmt, rows, errors, paths, plan["hash"], overlay_config, rank, job.method, model)
            shard, rows, errors = None, [], []
    return errs_total

def _prepare(out: str, paths: list[str], settings: dict, world: int) -> dict:
    """Rank 0, holding the lock on ``out``: write or check the settings, drop temporaries a killed run left,
    find the shards still to do."""
    import hashlib

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
        maps = torch.zeros(0, 0, 0, 0, dtype=torch.float16)
        cls, logits = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0)
    if config is not None and rows:
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
