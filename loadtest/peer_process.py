"""A benchmark peer in its own process: started, waited on over HTTP, stopped with its
whole session (a peer may start daemons of its own, as Ray does)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from common import procs
from serving.server import free_port

ROOT = Path(__file__).resolve().parents[1]


class PeerProcess:
    """Subclasses give `name` and `command()` (and `env()` if they need more); then
    `with Peer(...) as p: p.wait_ready(); p.url`."""

    name = "peer"
    health_path = "/health"

    def __init__(
        self,
        *,
        log_dir: str | Path | None = None,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 10.0,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"{self.name}-{self.port}.log"
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            # Its own session (its children join it: one killpg ends all), SIGTERM when we
            # die.
            self.process = procs.spawn(
                self.command(),
                env=self.env(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(ROOT),
            )
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode}; log "
                    f"{self.log_path}:\n{self.log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}{self.health_path}", timeout=2.0) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            # then whatever it left in its session (workers a clean shutdown did not reap)
            procs.stop_group(proc, timeout_s=self.stop_timeout_s)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
