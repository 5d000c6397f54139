"""Start and stop a real `redis-server` (Debian's package) on a free port with its own data dir.

Tests, benchmarks and the single-host demo use it; production points at a managed Redis
(deploy/). Persistence is the append-only file with `appendfsync always`: a write the
server acknowledged is on disk, which is what "no acknowledged event is ever lost" needs
across a `kill -9` of the server.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common import procs

INSTALL_HINT = "install Debian's package: apt-get install -y redis-server (make venv does)"


class RedisServerError(RuntimeError):
    pass


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerError(f"redis-server: not found on PATH; {INSTALL_HINT}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """`with RedisServer(data_dir) as r:` runs redis-server until the block ends.

    `data_dir` keeps the append-only file, so stopping and starting again on the same
    folder (or a `kill()` then `start()`) recovers what was acknowledged.
    """

    data_dir: Path | str | None = None
    port: int = 0  # 0: a free one, picked at start
    appendfsync: str = "always"
    startup_timeout_s: float = 30.0
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, init=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir) / "redis.log"

    def start(self) -> RedisServer:
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="northstar-redis-")
            self.data_dir = self._tmp.name
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port()
        cmd = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(Path(self.data_dir).resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path.resolve()),
            *self.extra_args,
        ]  # fmt: skip
        # Its own process group, SIGTERM when we die: a crashed test or benchmark does not
        # leave redis-server running.
        self.process = procs.spawn(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:  # a bound on a hang, not a timing assertion
                if self.process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {self.process.returncode} at start; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RedisServerError(f"redis-server not answering PING after {self.startup_timeout_s} s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: what a crash looks like. `start()` again recovers from the data dir."""
        if self.process is not None and self.process.poll() is None:
            procs.kill_group(self.process.pid)  # with any child it forked (an AOF rewrite)
            self.process.wait()

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            # SIGTERM: redis-server finishes its append-only file; SIGKILL after 30 s.
            procs.stop_group(proc, timeout_s=30)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
