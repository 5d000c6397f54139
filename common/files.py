"""Atomic, durable file writes, and owner-only files for control-plane state.

Control-plane state (routing.json, the canary state and its MLflow registry, the
admin key) decides what production serves. Anyone who can rewrite it can change
the model users see, so it is created owner-only: files 0600, folders 0700,
whatever the umask says.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PUBLIC_FILE = 0o644


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder: a rename is durable only once its folder entry is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: str | Path) -> Path:
    """mkdir -p with 0700 on every folder this call creates. Existing folders are left as
    they are: chmod-ing a folder someone pointed us at (their home, say) would surprise."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it first
            d.mkdir(mode=PRIVATE_DIR)
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode is masked by the umask
    return path


def atomic_write_text(path: str | Path, text: str, *, mode: int = PUBLIC_FILE) -> Path:
    """Write `text` to `path` so a reader sees the old file or the new one, never half.

    Temp file in the same folder (rename is atomic only within a filesystem), created
    with `mode` from the start (no window where it is readable by others), fsync, rename,
    fsync the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; be exact
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(path.parent)
    return path


def write_private(path: str | Path, text: str) -> Path:
    """atomic_write_text, owner-only (0600), in a folder that is owner-only (0700)."""
    path = Path(path)
    private_dir(path.parent)
    return atomic_write_text(path, text, mode=PRIVATE_FILE)
