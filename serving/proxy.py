"""The front proxy: nginx in front of Triton's HTTP and gRPC ports, bounding every request body.

Triton 2.51 has no flag that limits a request body (its `--help` lists none; newer releases
add `--http-max-input-size`), and its HTTP server inflates a `Content-Encoding: gzip` body
in memory however large it unpacks. So `northstar serve` can run nginx on the public ports
with Triton behind it on loopback, and nginx enforces, before anything reaches Triton:

- at most `max_body_bytes` per request body, on HTTP (413 with a JSON error) and on gRPC
  (RESOURCE_EXHAUSTED);
- no compressed request bodies (HTTP 415; gRPC UNIMPLEMENTED, as the gRPC spec says for an
  encoding the server does not accept), since a compressed size bounds nothing;
- timeouts on slow bodies and headers.

What the proxy does not do (and Triton and `recommend` do): the shape, type and range of
each input, and the batch size (serving/README.md lists every check and where it lives).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from common import procs

TEMPLATE = Path(__file__).resolve().parent / "templates" / "nginx.conf.j2"
INSTALL_HINT = "install Debian's nginx (apt-get install -y nginx-light; make venv does)"


class ProxyError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProxyLimits:
    """What one request may cost at the proxy: ServerConfig.proxy_* fields set these."""

    # Sized to fit recommend's largest request (max_batch_size user ids) and a full ingest
    # batch as JSON with room to spare, while still bounding a request's memory.
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: int = 10
    read_timeout_s: int = 60
    workers: int = 1
    worker_connections: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "body_timeout_s", "read_timeout_s", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProxyLimits.{name}={getattr(self, name)}: expected >= 1")


def nginx_binary() -> str:
    # Debian installs it under /usr/sbin, which a non-root PATH often lacks.
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise ProxyError(f"nginx: not found; {INSTALL_HINT}")
    return path


def render_config(
    *,
    host: str,
    http_port: int,
    grpc_port: int,
    http_upstream: int,
    grpc_upstream: int,
    run_dir: Path | str,
    limits: ProxyLimits,
    error_log: str | None = None,
) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(TEMPLATE.read_text()).render(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        http_upstream=http_upstream,
        grpc_upstream=grpc_upstream,
        run_dir=str(run_dir),
        error_log=error_log or f"{run_dir}/error.log",
        **limits.__dict__,
    )


# The sidecar in deploy/base (triton-statefulset.yaml): nginx on the pod's 8000/8001, Triton
# on loopback 8010/8011, temp files in the pod's /tmp, errors to the container log.
K8S_SIDECAR = {
    "host": "0.0.0.0",
    "http_port": 8000,
    "grpc_port": 8001,
    "http_upstream": 8010,
    "grpc_upstream": 8011,
    "run_dir": "/tmp",
    "error_log": "stderr",
}


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.proxy > deploy/base/proxy/nginx.conf`: the sidecar's config."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--max-body-bytes", type=int, default=ProxyLimits.max_body_bytes)
    args = p.parse_args(argv)
    print(
        render_config(**K8S_SIDECAR, limits=ProxyLimits(max_body_bytes=args.max_body_bytes)), end=""
    )
    return 0


class FrontProxy:
    """`FrontProxy(...).start()` runs nginx on (host, http_port, grpc_port) in front of Triton
    on 127.0.0.1 (http_upstream, grpc_upstream) until `stop()`."""

    def __init__(
        self,
        *,
        host: str,
        http_port: int,
        grpc_port: int,
        http_upstream: int,
        grpc_upstream: int,
        limits: ProxyLimits = ProxyLimits(),
    ) -> None:
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.http_upstream = http_upstream
        self.grpc_upstream = grpc_upstream
        self.limits = limits
        self.process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def run_dir(self) -> Path:
        assert self._dir is not None, "start() first"
        return Path(self._dir.name)

    @property
    def error_log(self) -> Path:
        return self.run_dir / "error.log"

    def start(self, startup_timeout_s: float = 30.0) -> FrontProxy:
        binary = nginx_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="northstar-proxy-")
        conf = self.run_dir / "nginx.conf"
        conf.write_text(
            render_config(
                host=self.host,
                http_port=self.http_port,
                grpc_port=self.grpc_port,
                http_upstream=self.http_upstream,
                grpc_upstream=self.grpc_upstream,
                run_dir=self.run_dir,
                limits=self.limits,
            )
        )
        # -e: errors before the config's error_log is open go to our file, not /var/log.
        cmd = [binary, "-c", str(conf), "-p", str(self.run_dir), "-e", str(self.error_log)]
        check = subprocess.run([*cmd, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise ProxyError(f"nginx refused its config {conf}: {check.stderr.strip()}")
        # Its own process group with its workers, stopped as one; SIGTERM (nginx's fast
        # shutdown) when we die, even by SIGKILL.
        self.process = procs.spawn(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_listening(startup_timeout_s)
        return self

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        pending = {self.http_port, self.grpc_port}
        while pending and time.monotonic() < deadline:  # a bound on a hang only
            if self.process.poll() is not None:
                raise ProxyError(
                    f"nginx exited with code {self.process.returncode} at start: {self.log_tail()}"
                )
            for port in list(pending):
                with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                    pending.discard(port)
            if pending:
                time.sleep(0.05)
        if pending:
            self.stop()
            raise ProxyError(f"nginx not listening on {sorted(pending)} after {timeout_s} s")

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            # SIGQUIT is graceful: the requests in flight finish; the workers go with it.
            procs.stop_group(proc, sig=signal.SIGQUIT, timeout_s=15)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


if __name__ == "__main__":
    raise SystemExit(main())
