"""The one atomic-write primitive: temp file in the folder, fsync, rename, fsync the folder."""

import os
import stat

import numpy as np
import pandas as pd
import pytest

from common import files
from common.files import (
    PRIVATE_FILE,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    temp_path,
)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_temp_path_is_a_hidden_sibling_that_keeps_the_suffix(tmp_path):
    t = temp_path(tmp_path / "features.npz")
    assert t.parent == tmp_path and t.name.startswith(".features.npz.") and t.suffix == ".npz"
    assert temp_path(tmp_path / "state.json", suffix="").name.endswith(".tmp")
    assert temp_path(tmp_path / "a") != temp_path(tmp_path / "a")  # unique per call


def test_writers_that_need_a_filename(tmp_path):
    arrays = {"a": np.arange(3)}
    with atomic_path(tmp_path / "sub" / "x.npz") as tmp:  # np.savez keeps a .npz name
        np.savez(tmp, **arrays)
    with np.load(tmp_path / "sub" / "x.npz") as z:
        assert z["a"].tolist() == [0, 1, 2]
    df = pd.DataFrame({"u": [1, 2]})
    with atomic_path(tmp_path / "t.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "state.json", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_modes_are_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        public = atomic_write_bytes(tmp_path / "p.bin", b"\x00\x01")
        private = atomic_write_text(tmp_path / "k", "secret", mode=PRIVATE_FILE)
    finally:
        os.umask(old)
    assert public.read_bytes() == b"\x00\x01" and _mode(public) == 0o644
    assert private.read_text() == "secret" and _mode(private) == 0o600


def test_the_file_and_its_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(files, "fsync_path", lambda p: events.append(("fsync", str(p))))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))
    )
    path = atomic_write_text(tmp_path / "f.txt", "x")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert events[1][1] == str(path) and events[2][1] == str(tmp_path)
    assert events[0][1] != str(path)  # the temp file, before it has the name
