"""Writing output files: whole or not at all, and nothing left behind when a write fails.

Every file funcam writes goes through this module. ``atomic_write(path, write)`` opens a temporary file next
to ``path`` (``path.tmp-PID``, the one temporary name: ``is_temporary`` recognises it), lets ``write(f)`` fill
it, optionally ``fsync``s it, and renames it over ``path``: a reader sees the old file or the whole new one.
When anything fails (a full disk, a read-only folder, an interrupt) the temporary file is removed and the
error propagates, naming ``path``, so a failed run leaves no 0-byte or half-written file under any name.
``write_bytes``, ``write_text`` and ``write_npz`` are the usual ``write``\\ s; ``append_text`` adds to a log.

Every file is created here with ``open(..., "wb")`` (or ``"a"``), i.e. mode ``0o666 & ~umask`` (0644 under
the usual umask 022), the same for PNGs, HTML, JSON, shards and archives; libraries that create their own
files (safetensors writes 0600) are given a file object or bytes to write instead.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import BinaryIO, Callable, Mapping

TMP_MARK = ".tmp-"
_TMP = re.compile(re.escape(TMP_MARK) + r"\d+$")  # NAME.tmp-PID (an input named x.tmp-1.png is no temporary)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of ``atomic_write`` (left by a killed process, never read)."""
    return _TMP.search(name) is not None


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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> str:
    """Call ``write(f)`` on a new binary file, then rename it to ``path`` (after ``fsync`` when asked).
    Returns ``path``; on any failure removes the temporary file and re-raises."""
    path = os.fspath(path)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
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
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> str:
    """``atomic_write`` of ``text`` as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_npz(path: str | os.PathLike, arrays: Mapping, *, fsync: bool = False) -> str:
    """``atomic_write`` of ``numpy.savez(**arrays)`` (uncompressed; read back with ``allow_pickle=False``)."""
    import numpy as np

    return atomic_write(path, lambda f: np.savez(f, **arrays), fsync=fsync)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Add ``text`` (whole lines) to the log ``path``, created if missing: one write in append mode, so lines
    from earlier runs stay as they are. A log grows; it is never replaced, so it has no temporary file."""
    try:
        before = os.path.getsize(path)
    except OSError:
        before = None
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        # a full disk: no partial line, and no empty log that was not there before
        with contextlib.suppress(OSError):
            if before is None:
                os.unlink(path)
            else:
                os.truncate(path, before)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, os.fspath(path)) from e
        raise
