"""Atomic, durable file writes, and owner-only files for control-plane state.

Every file the project publishes for another process to read (a table, a model, a
snapshot, a state file) is written one way: to a temp file in the same folder, fsync-ed,
renamed over the target, and the folder fsync-ed. A reader sees the old file or the new
one, never half of one, and after a crash the new one is there or the old one is.
`atomic_path` is that rule for writers that need a filename (parquet, np.savez,
torch.save); `atomic_write_bytes` and `atomic_write_text` are it for bytes and text.

Control-plane state (routing.json, the canary state and its MLflow registry, the
admin key) decides what production serves. Anyone who can rewrite it can change
the model users see, so it is created owner-only: files 0600, folders 0700,
whatever the umask says.

Standard library only: the Triton image imports this module (models.snapshot).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
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


def temp_path(path: str | Path, suffix: str | None = None) -> Path:
    """A unique hidden sibling of `path`: `.NAME.PID.RANDOM.tmp` + `suffix`.

    Hidden (readers of a folder of tables skip names starting with "."), in the same folder
    (a rename is atomic only within one filesystem). `suffix` defaults to the target's own:
    some writers add their extension to a name that lacks it (np.savez adds ".npz").
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, mode: int = PUBLIC_FILE, suffix: str | None = None
) -> Iterator[Path]:
    """Yield a temp path to write; on a clean exit it replaces `path`, durably.

        with atomic_path(out / "model.pt") as tmp:
            torch.save(state, tmp)

    The temp file exists (empty) before the writer runs, created with `mode` (no window
    where others can read it; writers that open it "wb" keep the mode). On exit: chmod
    `mode` again (for a writer that re-created the file), fsync it, rename it over `path`,
    fsync the folder. If the body raises, the temp file is removed and `path` is untouched.
    The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; be exact
    finally:
        os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = PUBLIC_FILE) -> Path:
    """Write `data` to `path` so a reader sees the old file or the new one, never half."""
    path = Path(path)
    with atomic_path(path, mode=mode, suffix="") as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | Path, text: str, *, mode: int = PUBLIC_FILE) -> Path:
    """atomic_write_bytes of `text` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def write_private(path: str | Path, text: str) -> Path:
    """atomic_write_text, owner-only (0600), in a folder that is owner-only (0700)."""
    path = Path(path)
    private_dir(path.parent)
    return atomic_write_text(path, text, mode=PRIVATE_FILE)
