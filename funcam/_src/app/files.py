"""Writing output files: whole or not at all, and nothing left behind when a write fails.

``atomic_write(path, write)`` lets ``write(tmp)`` fill a temporary file next to ``path`` (``path.tmp-PID``),
optionally ``fsync``s it, and renames it over ``path``: a reader sees the old file or the whole new one. When
anything fails (a full disk, a read-only folder, an interrupt) the temporary file is removed and the error
propagates, so a failed run leaves no 0-byte or half-written file under any name.

Every file is created with ``open(..., "wb")``, i.e. mode ``0o666 & ~umask`` (0644 under the usual umask 022),
the same for PNGs, JSON, shards and archives; libraries that create their own files (safetensors writes 0600)
are given bytes to write instead.
"""
from __future__ import annotations

import os
from typing import Callable

TMP_MARK = ".tmp-"


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse fsync on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, fsync: bool = False) -> str:
    """Call ``write(tmp_path)``, then rename the temporary file to ``path`` (after ``fsync`` when asked).
    Returns ``path``; on any failure removes the temporary file and re-raises."""
    path = os.fspath(path)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:  # never created, or already gone
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # a failed write() names no file ("No space left on device"): name the one being written
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    if fsync:
        fsync_dir(os.path.dirname(path) or ".")
    return path


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> str:
    """``atomic_write`` of ``data``."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, fsync=fsync)
