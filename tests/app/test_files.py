"""The one atomic writer (funcam/_src/app/files.py): a file appears whole or not at all, a failure names the file
and leaves no temporary, and a log only ever grows by whole lines."""
from __future__ import annotations

import errno
import os

import pytest

from funcam._src.app import files
from tests.conftest import FullDisk


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    assert files.write_text(p, "one\n") == os.fspath(p)
    files.write_text(p, "two\n", fsync=True)
    assert p.read_text() == "two\n" and os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old\n")
    real_open = open

    def full_disk(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f) if "w" in mode and files.TMP_MARK in os.fspath(path) else f

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError) as e:
        files.write_text(p, "new content that does not fit\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == os.fspath(p)
    monkeypatch.undo()
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["a.txt"]


def test_npz_round_trip(tmp_path):
    import numpy as np

    arrays = {"maps": np.arange(6, dtype=np.float32).reshape(2, 3), "classes": np.array([[1], [2]])}
    files.write_npz(tmp_path / "m.npz", arrays)
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert all(np.array_equal(z[k], v) for k, v in arrays.items())


@pytest.mark.parametrize("name,temporary", [("a.png.tmp-123", True), ("x.tmp-1.png", False), ("a.png", False),
                                            ("a.tmp-", False)])
def test_is_temporary(name, temporary):
    assert files.is_temporary(name) is temporary


@pytest.mark.parametrize("existed", [True, False], ids=["log-existed", "new-log"])
def test_append_on_a_full_disk_takes_back_the_partial_line(tmp_path, monkeypatch, existed):
    log = tmp_path / "runs.jsonl"
    if existed:
        log.write_text('{"run": 1}\n')
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **kw: (
        FullDisk(real_open(path, mode, *a, **kw)) if "a" in mode else real_open(path, mode, *a, **kw)))
    with pytest.raises(OSError) as e:
        files.append_text(log, '{"run": 2, "a long line": true}\n')
    monkeypatch.undo()
    assert e.value.filename == os.fspath(log)
    assert (log.read_text() == '{"run": 1}\n') if existed else not log.exists()
