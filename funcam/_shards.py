"""On-disk layout of a dataset run: settings, shard files, manifest; every write atomic.

::

    OUT/settings.json              what the maps depend on (model weights hash, method, classes, ...), the lock
    OUT/shards/shard-000012.safetensors (or .npz)   images [12 * S, 13 * S) of the sorted list
    OUT/manifest.jsonl             rank 0 at the end: a header line, then one line per image in global order
    OUT/errors.jsonl               one line per unreadable image: {"path", "error"}
    OUT/overlays/<path>.png        optional

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
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMATS = ("safetensors", "npz")
SHARD_RE = re.compile(r"^shard-(\d{6})\.(safetensors|npz)$")
TMP_MARK = ".tmp-"


class DatasetError(ValueError):
    """A dataset run that cannot start or continue; the message says why and what to do."""


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:06d}.{fmt}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename to ``path``: readers see the old file or the whole new one."""
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


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
    """Atomically write ``tensors`` and the JSON ``meta`` as one shard file."""
    blob = json.dumps(meta)

    def write(tmp: str) -> None:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"funcam": blob})
        else:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.array(blob), **{k: v.numpy() for k, v in tensors.items()})

    atomic_write(path, write)


def read_meta(path: str) -> dict | None:
    """The shard's metadata, or None when the file cannot be read as a shard (treated as not done)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return json.loads((f.metadata() or {})["funcam"])
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except Exception:  # noqa: BLE001 - any unreadable file is simply a shard to redo
        return None


def read_rows(path: str, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
    """Rows ``[lo, hi)`` of the named tensors; safetensors reads only those bytes (memory-mapped slices)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

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
        write_text(os.path.join(out, "settings.json"), json.dumps(settings, indent=1, sort_keys=True) + "\n")
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


def clean_temporaries(folder: str) -> None:
    """Remove files left under a temporary name by a killed run (they are never read)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if TMP_MARK in name:
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
