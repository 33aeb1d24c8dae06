"""On-disk layout of a dataset run: settings, shard files, manifest; every write atomic.

::

    OUT/settings.json              what the maps depend on (model weights hash, method, classes, ...), the lock
    OUT/shards/shard-000012.safetensors (or .npz)   images [12 * S, 13 * S) of the sorted list
    OUT/manifest.jsonl             rank 0 at the end: a header line, then one line per image in global order
    OUT/errors.jsonl               one line per unreadable image: {"path", "error"}
    OUT/overlays/<path>__<class>__<method>.png   optional (see funcam._src.app.overlay)
    OUT/.lock                      held by the run writing to OUT (its PID inside)

A shard holds ``maps (n, K, h, w) float16``, ``classes (n, K) int64``, ``logits (n, N) float32`` and
``index (n,) int64`` (global image numbers) for its ``n`` readable images; its metadata (JSON) holds their paths,
the images that failed with the reasons, and the hash of the settings. A file is only ever created under a
temporary name and renamed with ``os.replace`` after ``fsync``, so a file with a final name is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from funcam._src.app.files import is_temporary, write_bytes, write_npz, write_text

FORMATS = ("safetensors", "npz")
SHARD_RE = re.compile(r"^shard-(\d{6})\.(safetensors|npz)$")
LOCK_NAME = ".lock"


class DatasetError(ValueError):
    """A dataset run that cannot start or continue; the message says why and what to do."""


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:06d}.{fmt}"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict: names in sorted order, each with its dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # a uint8 view covers every dtype numpy lacks (bfloat16, float8)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_shard(path: str, fmt: str, tensors: dict[str, Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` and the JSON ``meta`` as one shard file (mode 0644 under umask 022, like
    every other output: safetensors' own ``save_file`` would create it 0600)."""
    blob = json.dumps(meta)
    if fmt == "safetensors":
        write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"funcam": blob}),
                    fsync=True)
    else:
        write_npz(path, {"meta": np.array(blob), **{k: v.numpy() for k, v in tensors.items()}}, fsync=True)


def read_meta(path: str) -> dict | None:
    """The shard's metadata, or None when the file cannot be read as a shard (treated as not done)."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                return json.loads((f.metadata() or {})["funcam"])
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except Exception:  # noqa: BLE001 - any unreadable file is simply a shard to redo
        return None


def read_rows(path: str, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
    """Rows ``[lo, hi)`` of the named tensors; safetensors reads only those bytes (memory-mapped slices)."""
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            return {n: f.get_slice(n)[lo:hi] for n in names}
    with np.load(path, allow_pickle=False) as z:
        return {n: torch.from_numpy(np.array(z[n][lo:hi])) for n in names}


def load_settings(out: str) -> dict | None:
    path = os.path.join(out, "settings.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_settings(out: str, settings: dict) -> None:
    """Write ``OUT/settings.json``, or refuse when it records a different setting (names what differs)."""
    old = load_settings(out)
    if old is None:
        write_text(os.path.join(out, "settings.json"), json.dumps(settings, indent=1, sort_keys=True) + "\n",
                   fsync=True)
        return
    diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if diff:
        parts = []
        for k in diff[:4]:
            a, b = _short(old.get(k)), _short(settings.get(k))
            parts.append(f"{k}: {a} before, {b} now")
        raise DatasetError(f"{out} holds results made with different settings ({'; '.join(parts)}); mixing them "
                           f"is refused: use a new --out, or delete {out} to start over")


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


class Lock:
    """An exclusive lock on an output folder, held while the object lives (``release()`` ends it early).

    ``OUT/.lock`` holds the owner's PID and host for the message a second run gets. The lock itself is a
    ``flock`` on that file, which the kernel drops when its process ends however it ends: a lock file left by
    a killed run is simply taken over, and no PID is ever guessed to be dead.
    """

    def __init__(self, out: str):
        import socket

        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock (one run per --out is then the user's to ensure)
            self.fd = None
            return
        path = os.path.join(out, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            finally:
                os.close(fd)
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else \
                "another process"
            raise DatasetError(f"{out} is in use by {who} (another explain-dir run writes there); wait for it to "
                               f"finish, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (deleting it would race a waiting run)
            self.fd = None


def clean_temporaries(folder: str) -> None:
    """Remove files left under a temporary name by a killed run (they are never read)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if is_temporary(name):
                os.unlink(os.path.join(dirpath, name))


def done_shards(out: str, fmt: str, n_shards: int, shash: str, sizes: list[int]) -> set[int]:
    """Shards whose file has the final name, opens, belongs to these settings and covers all its images."""
    done = set()
    folder = os.path.join(out, "shards")
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        m = SHARD_RE.match(name)
        if not m or m.group(2) != fmt or int(m.group(1)) >= n_shards:
            continue
        s = int(m.group(1))
        meta = read_meta(os.path.join(folder, name))
        if meta and meta.get("settings") == shash and len(meta["paths"]) + len(meta["errors"]) == sizes[s]:
            done.add(s)
    return done


class MapShard(NamedTuple):
    """Maps of ``n`` images read back from one shard: ``paths (n)``, ``maps (n, K, h, w) float16``,
    ``classes (n, K) int64``, ``logits (n, N) float32``."""
    paths: tuple[str, ...]
    maps: Tensor
    classes: Tensor
    logits: Tensor


def load_maps(out: str, *, paths: Sequence[str] | None = None, classes: Sequence[int] | None = None
              ) -> Iterator[MapShard]:
    """Iterate over the finished shards of ``out`` as ``MapShard`` chunks, reading lazily.

    paths: only these images (relative paths as in the manifest); a path with no maps raises ``KeyError``
        (with the recorded error when it failed to read).
    classes: only these classes, as columns in this order: ``maps (n, len(classes), h, w)``, NaN where an
        image's explained classes (e.g. its top-k) did not include that class.
    Safetensors shards are memory-mapped and only the needed rows are read; npz shards are read per array.
    """
    settings = load_settings(out)
    if settings is None:
        raise DatasetError(f"{out} is not a funcam dataset output (no settings.json)")
    folder = os.path.join(out, "shards")
    files = sorted(n for n in os.listdir(folder) if SHARD_RE.match(n)) if os.path.isdir(folder) else []
    metas = [(os.path.join(folder, n), m) for n in files if (m := read_meta(os.path.join(folder, n)))]
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
        t = read_rows(path, ("maps", "classes", "logits"), rows[0], rows[-1] + 1)
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

