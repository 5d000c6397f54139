"""Run the real `tritonserver` from the nvidia-pytriton wheel, and manage what it serves.

The wheel ships the binary, the Python backend and one backend stub per Python
version. Running it directly needs three things (found by trying):
  - a backend folder holding `python/` plus the stub for *this* Python;
  - LD_LIBRARY_PATH with the wheel's `nvidia_pytriton.libs`;
  - this interpreter's bin folder first on PATH: the stub imports numpy and the
    project from the first `python3` it finds there.

The server runs in explicit model-control mode: it loads `retrieval` and
`recommend` at start, and after that only what the repository API asks for
(`serving.control`), so a half-exported version never goes live.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import psutil

from common import procs
from feedback.sink import EVENT_LOG_ENV
from online.config import ONLINE_STORE_ENV, OnlineConfigError, OnlineStoreConfig, OnlineStoreError
from online.routing_store import RoutingStore, RoutingStoreError
from online.store import RedisFeatureStore
from serving import auth
from serving import repository as layout
from serving.control import ServerError, load_versions, ready_versions
from serving.core_slots import server_folder
from serving.proxy import FrontProxy, ProxyError, ProxyLimits
from serving.routing import RoutingState, read_store_marker, routing_of, write_store_marker

log = logging.getLogger(__name__)


PORT_ATTEMPTS = 3
_PORT_TAKEN = re.compile(r"already in use|address in use|failed to listen|failed to bind", re.I)


@dataclass(frozen=True)
class ServerConfig:
    """What `northstar serve` runs: `--config FILE` (a [server] table or top level) and
    `--set KEY=VALUE`; its flags are shorthands for some fields. These defaults are the only
    ones."""

    repo: str = "model_repository"
    # 127.0.0.1 keeps a development server private; the Docker image listens on 0.0.0.0.
    host: str = "127.0.0.1"
    http_port: int | None = 8000  # 0 or None: pick a free port
    grpc_port: int | None = 8001
    metrics_port: int | None = 8002
    models: tuple[str, ...] = (layout.RETRIEVAL, layout.RECOMMEND)
    # Cold start on 2 cores: a few seconds per Python model (imports onnxruntime, pandas).
    startup_timeout_s: float = 120.0
    # Triton's own wait for in-flight requests on shutdown; stop() kills after this + 10 s.
    exit_timeout_s: int = 5
    log_file: str | None = None  # default: a fresh file under the system temp folder
    log_verbose: int = 0
    backend_dir: str | None = None  # default: prepared from the wheel (prepare_backends)
    # The event log (feedback/README.md). Set (here or as NORTHSTAR_EVENT_LOG): `recommend`
    # logs impressions to it and the `feedback` ingest model is loaded as well.
    event_log: str | None = None
    # The shared online store (online/, serving/live.py), e.g. redis://127.0.0.1:6379/0. Set
    # (here or as NORTHSTAR_ONLINE_STORE): `recommend` reads live user features from it and
    # the `feedback` model applies acknowledged clicks to it. Unset: per-version snapshots.
    online_store: str | None = None
    # `--metrics-config` entries. Summary latencies add nv_inference_request_summary_us with
    # quantiles (p50..p99.9) per model version: the canary's p99 guardrail reads them.
    metrics_config: tuple[str, ...] = ("summary_latencies=true",)
    # Lock the control plane (model load/unload, model config, shared memory, trace,
    # logging) behind the admin key (serving/auth.py). Off only for debugging.
    restrict_control: bool = True
    # nginx in front of Triton's HTTP and gRPC ports (serving/proxy.py), bounding request
    # bodies, which Triton 2.51 cannot: "on", "off", or "auto" = on when `host` listens
    # beyond loopback (a server others can reach), off for a private development server.
    front_proxy: str = "auto"
    proxy_max_body_bytes: int = ProxyLimits.max_body_bytes

    def __post_init__(self) -> None:
        if self.front_proxy not in ("auto", "on", "off"):
            raise ValueError(
                f"ServerConfig.front_proxy={self.front_proxy!r}: expected auto, on or off"
            )
        if self.proxy_max_body_bytes < 1024:
            raise ValueError(
                f"ServerConfig.proxy_max_body_bytes={self.proxy_max_body_bytes}: expected "
                ">= 1024 (a recommend request alone is a few hundred bytes)"
            )
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"ServerConfig.{name}={port}: expected 0..65535 (0: free port)")
        if not self.startup_timeout_s > 0:
            raise ValueError(
                f"ServerConfig.startup_timeout_s={self.startup_timeout_s}: expected > 0"
            )
        if self.exit_timeout_s < 0 or self.log_verbose < 0:
            raise ValueError("ServerConfig.exit_timeout_s and log_verbose must be >= 0")

    @classmethod
    def on_free_ports(cls, repo: str | Path, **kw) -> ServerConfig:
        """Every port picked free at start: tests, benchmarks, servers side by side."""
        return cls(repo=str(repo), http_port=0, grpc_port=0, metrics_port=0, **kw)


# ---------------------------------------------------------------------------- the binary


def _pytriton_root() -> Path:
    import pytriton  # lazy: a heavy import (the whole wrapper), and only its folder is wanted

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def tritonserver_binary() -> Path:
    path = _pytriton_root() / "bin" / "tritonserver"
    if not path.exists():
        raise ServerError(f"{path}: not found; install the `nvidia-pytriton` wheel")
    return path


def _libs_dir() -> Path:
    return _pytriton_root().parents[1] / "nvidia_pytriton.libs"


def _cache_root() -> Path:
    env = os.environ.get("NORTHSTAR_TRITON_CACHE")
    if env:
        return Path(env)
    home = Path.home() / ".cache" / "northstar" / "triton"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:  # read-only home (some CI runners): fall back to the temp folder
        return Path(tempfile.gettempdir()) / "northstar-triton"


def prepare_backends(cache_dir: str | Path | None = None) -> Path:
    """A backend folder: the wheel's `backends/python` plus the stub for this Python.

    Built once per (wheel version, Python version) and reused; built in a staging
    folder and renamed, so two servers starting at once never see half of it.
    """
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = _pytriton_root()
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"{stub}: nvidia-pytriton has no Python backend stub for Python {py}")
    base = Path(cache_dir) if cache_dir else _cache_root()
    target = base / f"pytriton-{version('nvidia-pytriton')}-py{py}" / "backends"
    if (target / "python" / stub.name).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".backends-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(root / "backends", staging, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, staging / "python" / stub.name)
    os.chmod(staging / "python" / stub.name, 0o755)
    try:
        os.rename(staging, target)
    except OSError:  # another process built it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libs = str(_libs_dir())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH")) if p)
    # The Python models import from the first python3 on PATH: make it this one.
    env["PATH"] = os.pathsep.join(
        p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p
    )
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the server


class TritonServer:
    """`with TritonServer(cfg) as server:` starts tritonserver, waits for ready, stops it.

    Readiness is polled while checking that the process is alive; if it dies, the
    error carries the tail of its log.
    """

    def __init__(self, cfg: ServerConfig = ServerConfig()):
        self.cfg = cfg
        self.repo = Path(cfg.repo).resolve()
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log = None
        bind_host = cfg.host
        self.http_port = cfg.http_port or free_port(bind_host)
        self.grpc_port = cfg.grpc_port or free_port(bind_host)
        self.metrics_port = cfg.metrics_port or free_port(bind_host)
        loopback = bind_host in ("127.0.0.1", "localhost", "::1")
        self.proxied = cfg.front_proxy == "on" or (cfg.front_proxy == "auto" and not loopback)
        self.proxy: FrontProxy | None = None
        # Behind the proxy, Triton listens on loopback only: (http, grpc) ports, picked free.
        self._upstream = (free_port(), free_port()) if self.proxied else None
        # Clients on this machine reach a 0.0.0.0 server through the loopback address.
        self.client_host = "127.0.0.1" if bind_host in ("0.0.0.0", "") else bind_host
        log_path = cfg.event_log or os.environ.get(EVENT_LOG_ENV) or None
        # A path is made absolute (the models run in another cwd); a URL (redis://…) is not.
        self.event_log = (
            None
            if not log_path
            else log_path
            if "://" in str(log_path)
            else str(Path(log_path).resolve())
        )
        self.online_store = cfg.online_store or os.environ.get(ONLINE_STORE_ENV) or None
        self.models = tuple(cfg.models)
        self.admin_key: str | None = None  # resolved at start(): it may create the key file
        self.routing: RoutingState | None = None  # what start() found and restored
        self.routing_epoch = 0  # the store's epoch start() found; 0: routing.json
        if self.event_log and layout.FEEDBACK not in self.models:
            self.models += (layout.FEEDBACK,)

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        backends = str(self.cfg.backend_dir or prepare_backends())
        if self._upstream is not None:
            host, (http_port, grpc_port) = "127.0.0.1", self._upstream
        else:
            host, http_port, grpc_port = self.cfg.host, self.http_port, self.grpc_port
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.repo}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--backend-directory={backends}",
            f"--http-address={host}",
            f"--http-port={http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={self.cfg.host}",
            f"--metrics-port={self.metrics_port}",
            *(f"--metrics-config={m}" for m in self.cfg.metrics_config),
            f"--exit-timeout-secs={self.cfg.exit_timeout_s}",
            f"--log-verbose={self.cfg.log_verbose}",
            "--strict-readiness=true",
            "--allow-gpu-metrics=false",
        ]
        if self.admin_key:
            cmd += auth.restricted_flags(self.admin_key)
        return cmd

    def start(self) -> TritonServer:
        if not self.repo.is_dir():
            raise FileNotFoundError(f"{self.repo}: no model repository; run `northstar export`")
        for model in self.models:
            if not (self.repo / model / layout.CONFIG_FILE).exists():
                raise FileNotFoundError(
                    f"{self.repo / model / layout.CONFIG_FILE}: missing; run `northstar export`"
                )
        if self.online_store:
            self._check_online_store()
            self._init_routing_store()
        if self.cfg.restrict_control:
            self.admin_key = auth.admin_key(create=True)
        # A server of this repository that was killed with its wrapper leaves stubs behind.
        reap_orphan_stubs(repo=self.repo)
        backends = Path(self.cfg.backend_dir or prepare_backends())
        for model in self.models:
            cfg = layout.read_config(self.repo / model / layout.CONFIG_FILE)
            backend = cfg.backend or ("onnxruntime" if cfg.platform.startswith("onnx") else "")
            if backend and not (backends / backend).is_dir():
                raise ServerError(
                    f"{self.repo / model / layout.CONFIG_FILE} needs the {backend!r} backend, "
                    f"which {backends} does not have (nvidia-pytriton ships only 'python'); "
                    "re-export with --target cpu, or serve the gpu target with the Dockerfile"
                )
        if self.cfg.log_file:
            self.log_path = Path(self.cfg.log_file)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            fd, name = tempfile.mkstemp(prefix=f"tritonserver-{self.http_port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        for attempt in range(PORT_ATTEMPTS):
            try:
                if self.proxied:
                    self._start_proxy()
                self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
                # Its own process group (its stubs join it): Ctrl-C reaches us and we shut
                # the server down in order, and stop() can end the group. SIGTERM when we
                # die, even by SIGKILL: Triton then stops its stubs and frees their memory.
                self.process = procs.spawn(
                    self.command(),
                    env=self.env(),
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                self._wait_ready()
                self.routing = self._restore_routing()
                return self
            except ServerError as exc:
                self.stop()
                # A port picked free (bound, then released) can be taken by another process
                # before tritonserver binds it. Only that race is retried, on new ports.
                if attempt + 1 == PORT_ATTEMPTS or not self._repick_ports(str(exc)):
                    raise
                log.warning("a picked port was taken before tritonserver bound it; retrying")
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _repick_ports(self, error: str) -> bool:
        """New free ports for those the config left to us; False if none was ours to move
        or the failure was not a port already in use."""
        auto = [
            name
            for name, port in (
                ("http_port", self.cfg.http_port),
                ("grpc_port", self.cfg.grpc_port),
                ("metrics_port", self.cfg.metrics_port),
            )
            if not port
        ]
        if not (auto or self._upstream) or not _PORT_TAKEN.search(error):
            return False
        for name in auto:
            setattr(self, name, free_port(self.cfg.host))
        if self._upstream is not None:
            self._upstream = (free_port(), free_port())
        return True

    def _check_online_store(self) -> None:
        """A store that does not answer is reported now, by URL, not as a model that failed
        to load minutes later."""
        try:
            RedisFeatureStore.from_config(OnlineStoreConfig(url=self.online_store)).close()
        except (OnlineConfigError, OnlineStoreError) as exc:
            raise ServerError(f"online store: {exc}") from None

    def _init_routing_store(self) -> None:
        """With the store, routing lives in it (serving/routing.py): record that next to
        routing.json, so every switch_routing on this repository writes the store, and
        create the record from routing.json if the store has none yet (an existing record
        wins: it is the truth, routing.json only mirrors it)."""
        try:
            same = read_store_marker(self.repo) == (self.online_store, "northstar")
        except ValueError:  # unreadable: written again below
            same = False
        try:
            if not same:
                write_store_marker(self.repo, self.online_store)
        except OSError as exc:  # a read-only repository volume, say
            log.warning(
                "could not record the routing store next to routing.json (%s): controllers "
                "must be given it (switch_routing(store=...) or $NORTHSTAR_ONLINE_STORE)",
                exc,
            )
        path = layout.routing_path(self.repo)
        rs = RoutingStore.from_url(self.online_store)
        try:
            if rs.read() is None and path.exists():
                rec = rs.initialize(RoutingState.load(path).to_dict())
                log.info("routing record created from %s (epoch %d)", path, rec.epoch)
        except RoutingStoreError as exc:
            raise ServerError(f"online store {self.online_store}: {exc}") from None
        finally:
            rs.close()

    def _start_proxy(self) -> None:
        assert self._upstream is not None
        self.proxy = FrontProxy(
            host=self.cfg.host,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            http_upstream=self._upstream[0],
            grpc_upstream=self._upstream[1],
            limits=ProxyLimits(max_body_bytes=self.cfg.proxy_max_body_bytes),
        )
        try:
            self.proxy.start()
        except ProxyError as exc:
            self.proxy = None
            raise ServerError(f"front proxy: {exc}") from exc

    def _restore_routing(self) -> RoutingState | None:
        """Serve what the durable routing says, whatever config.pbtxt lists.

        switch_routing() writes routing.json before it persists the config's version list, so a
        crash in between leaves a routed version that a restart would not load: every
        canary user would then get errors. Load it here, before anyone is told we are up.
        With the online store the routing is the store's record (and a pending switch
        needs both its sides).
        """
        if layout.RETRIEVAL not in self.models:
            return None
        if self.online_store:  # the store's record, both sides of a pending switch
            routing, routed, where = self._store_routing()
        else:
            path = layout.routing_path(self.repo)
            if not path.exists():
                return None
            routing = RoutingState.load(path)
            routed, where = set(routing.versions), str(path)
        if routing is None:
            return None
        ready = set(ready_versions(self.grpc_url))
        missing = routed - ready
        if missing:
            log.warning("%s needs retrieval versions %s; loading them", where, sorted(missing))
            load_versions(self.grpc_url, self.repo, ready | routed)
        return routing

    def _store_routing(self) -> tuple[RoutingState | None, set[int], str]:
        rs = RoutingStore.from_url(self.online_store)
        try:
            rec = rs.read()
        finally:
            rs.close()
        if rec is None:
            return None, set(), self.online_store
        now = time.time()
        routing = routing_of(rec.in_force(now), rs.key)
        routed = set(routing_of(rec.current, rs.key).versions) | set(routing.versions)
        self.routing_epoch = rec.epoch
        return routing, routed, f"routing epoch {rec.epoch} in {self.online_store}"

    def env(self) -> dict[str, str]:
        env = server_env()
        if self.online_store:
            env[ONLINE_STORE_ENV] = self.online_store
        if self.event_log:
            env[EVENT_LOG_ENV] = self.event_log
        return env

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        urls = [f"http://{self.http_url}/v2/health/ready"] + [
            f"http://{self.http_url}/v2/models/{m}/ready" for m in self.models
        ]
        while time.monotonic() < deadline:
            rc = self.process.poll()
            if rc is not None:
                raise ServerError(
                    f"tritonserver exited with code {rc} while starting; log {self.log_path}:\n"
                    + self.log_tail()
                )
            if all(_http_ok(u) for u in urls):
                return
            time.sleep(0.1)
        raise ServerError(
            f"tritonserver not ready after {self.cfg.startup_timeout_s:.0f} s; log "
            f"{self.log_path}:\n" + self.log_tail()
        )

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL the group if it hangs.

        Either way, stubs left by a server that died (kill -9, OOM) are reaped with their
        shared memory, and then whatever else is still in the server's group is killed.
        """
        proc, self.process = self.process, None
        rc = None
        if proc is not None:
            rc = procs.stop_group(proc, timeout_s=self.cfg.exit_timeout_s + 10, sweep=False)
            reap_orphan_stubs(server_pid=proc.pid)
            procs.kill_group(proc.pid)
            shutil.rmtree(server_folder(layout.RECOMMEND, proc.pid), ignore_errors=True)
        # After Triton: requests in flight drained through the proxy first.
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


STUB_NAME = "triton_python_backend_stub"


def reap_orphan_stubs(*, server_pid: int | None = None, repo: str | Path | None = None) -> int:
    """Kill Python-backend stubs whose tritonserver is gone, and free their shared memory.

    Triton tells its stubs to exit when it shuts down; a server killed with SIGKILL never
    does, and its stubs live on, each holding its /dev/shm region (1 MB and up). A stub's argv is
    `stub model.py shm_region shm_size shm_growth parent_pid backend_dir ...`.
    Select by the dead server's pid, or by a model path inside `repo` whose parent is dead.
    Returns the number of stubs reaped.
    """
    root = str(Path(repo).resolve()) + os.sep if repo is not None else None
    reaped = 0
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info.get("cmdline") or []
        if len(argv) < 6 or not argv[0].endswith(STUB_NAME) or not argv[5].isdigit():
            continue
        parent = int(argv[5])
        if server_pid is not None:
            mine = parent == server_pid
        else:
            mine = root is not None and argv[1].startswith(root)
        if not mine or (parent != server_pid and psutil.pid_exists(parent)):
            continue
        with contextlib.suppress(psutil.Error):
            p.kill()
            p.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(f"/dev/shm/{argv[2]}")
        reaped += 1
        log.warning("reaped stub pid %d (%s) of dead tritonserver %d", p.pid, argv[1], parent)
    return reaped


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def serve_forever(server: TritonServer) -> int:
    """Block until SIGINT/SIGTERM or until the server dies; always stop it."""

    def _term(_signum, _frame):
        raise KeyboardInterrupt

    # SIGINT too: a server started in the background of a script inherits SIGINT ignored.
    previous = {s: signal.signal(s, _term) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while server.is_alive():
            time.sleep(0.5)
        print(
            f"tritonserver exited; last lines of {server.log_path}:\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
