"""The admin key: who may change what Triton serves.

Clients may call inference, health, metadata and statistics. The control plane
(loading and unloading models, reading or overriding model configs, registering
shared memory, and the trace and logging settings, which can point the server at
files to write) needs a header whose value only the operator knows. Triton
enforces it itself, on both endpoints:

    --http-restricted-api=model-repository,...:northstar-admin-key=<key>
    --grpc-restricted-protocol=model-repository,...:northstar-admin-key=<key>

Where the key comes from, first match wins:
  1. NORTHSTAR_ADMIN_KEY (the value; for containers and CI secrets);
  2. NORTHSTAR_ADMIN_KEY_FILE (a path; Docker and Kubernetes mount secrets as files);
  3. ~/.config/northstar/admin.key ($XDG_CONFIG_HOME respected), which `northstar serve`
     creates owner-only (0600) with a random key the first time.

The key appears on tritonserver's command line (that is the only way Triton takes
it), so on a shared host other users can read it from /proc; run the server as its
own user, or in a container, where that matters.

`python -m serving.auth exec tritonserver ARGS...` adds the flags and execs the
server: the Docker image's entrypoint, so no key is ever baked into an image.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

from common.files import write_private

HEADER = "northstar-admin-key"  # gRPC metadata keys must be lower case
GRPC_PREFIX = "triton-grpc-protocol-"  # Triton's gRPC frontend prepends this to HEADER
KEY_ENV = "NORTHSTAR_ADMIN_KEY"
KEY_FILE_ENV = "NORTHSTAR_ADMIN_KEY_FILE"
# What a client must not do without the key. `health`, `metadata`, `inference` and
# `statistics` stay open: load balancers, clients and dashboards need them.
RESTRICTED = ("model-repository", "model-config", "shared-memory", "trace", "logging")


class AdminKeyError(RuntimeError):
    """No usable admin key (missing, empty, or readable by other users)."""


def key_file() -> Path:
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "northstar" / "admin.key"


def admin_key(*, create: bool = False) -> str | None:
    """The key, or None when there is none and `create` is false.

    The default key file is refused when other users can read it, as ssh refuses such a
    private key: that key no longer keeps anyone out. A file named by NORTHSTAR_ADMIN_KEY_FILE
    is a mounted secret whose mode the orchestrator owns (Kubernetes mounts 0644), so it
    is not checked.
    """
    value = os.environ.get(KEY_ENV, "").strip()
    if value:
        return _checked(value, KEY_ENV)
    path = key_file()
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 and not os.environ.get(KEY_FILE_ENV):
            raise AdminKeyError(
                f"{path}: admin key file has mode {mode:04o}; expected 0600 (chmod 600 {path})"
            )
        return _checked(path.read_text().strip(), str(path))
    if not create:
        return None
    if os.environ.get(KEY_FILE_ENV):
        # A configured secret that is missing is a deployment error, not a reason to
        # invent a key nobody else knows.
        raise AdminKeyError(f"{path}: {KEY_FILE_ENV} points at a file that does not exist")
    key = secrets.token_urlsafe(32)
    write_private(path, key + "\n")
    return key


def _checked(value: str, where: str) -> str:
    # Triton splits the flag on ':' and '='; a header value must also be printable ASCII.
    if len(value) < 16 or not value.isascii() or any(c in value for c in ":=, \t\n"):
        raise AdminKeyError(
            f"{where}: admin key must be >= 16 printable ASCII characters without "
            "':', '=', ',' or spaces"
        )
    return value


def header_name(protocol: str) -> str:
    """Triton checks `<key>` on HTTP and `triton-grpc-protocol-<key>` on gRPC."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol={protocol!r}; expected 'grpc' or 'http'")
    return GRPC_PREFIX + HEADER if protocol == "grpc" else HEADER


def headers(protocol: str = "grpc", key: str | None = None) -> dict[str, str]:
    """The header that unlocks the control plane; {} when no key is configured."""
    key = key if key is not None else admin_key()
    return {header_name(protocol): key} if key else {}


def restricted_flags(key: str) -> list[str]:
    spec = f"{','.join(RESTRICTED)}:{HEADER}={_checked(key, 'admin key')}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def main(argv: list[str] | None = None) -> int:  # returns only on refusal
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "exec":
        print("usage: python -m serving.auth exec tritonserver [ARGS...]", file=sys.stderr)
        return 2
    try:
        key = admin_key()
    except AdminKeyError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 2
    if key is None:
        # Fail closed: an image started without its secret must not serve an open
        # control plane.
        print(
            f"refusing to start: no admin key; set {KEY_ENV} or mount a secret file and "
            f"set {KEY_FILE_ENV}",
            file=sys.stderr,
        )
        return 2
    cmd = [*argv[1:], *restricted_flags(key)]
    os.execvp(cmd[0], cmd)  # replaces this process; raises OSError if it cannot


if __name__ == "__main__":
    raise SystemExit(main())
