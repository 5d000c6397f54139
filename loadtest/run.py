"""`python -m loadtest.run` (`make loadtest`): serve a repository, run Locust against it, report.

1. the repository: --repo, or an untrained catalogue of --items built once and cached
   (loadtest/catalogue.py; --tiny for a seconds-sized one);
2. tritonserver on free ports, with a fresh event log so that `feedback` is loaded and
   `recommend` logs impressions (--no-feedback serves without both);
3. Locust headless as a subprocess, in its own process group, under a hard timeout
   (with gRPC on gevent it can hang after its summary: see loadtest/locustfile.py);
4. Locust's CSV files and HTML report in --out (default reports/loadtest/).

Exit code: Locust's (1 when a threshold in locust.conf fails), 124 on the hard timeout.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from common import procs
from loadtest import catalogue
from serving import repository as layout
from serving.server import ServerConfig, TritonServer

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
LOCUST_CONF = HERE / "locust.conf"
USER_CLASSES = {"grpc": ["TritonGrpcUser"], "http": ["TritonHttpUser"]}
USER_CLASSES["both"] = USER_CLASSES["grpc"] + USER_CLASSES["http"]
TIMEOUT_EXIT = 124
FEEDBACK_MODEL = "feedback"  # the ingest model (model_repository/feedback)


def parse_run_time(text: str) -> float:
    """Locust's --run-time syntax ("30s", "2m", "1h30m", "45") in seconds."""
    text = text.strip().lower()
    if text.isdigit():
        return float(text)
    total, num = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms" and num:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
        else:
            raise ValueError(f"run time {text!r}: expected e.g. 30s, 2m, 1h30m")
    if num:
        raise ValueError(f"run time {text!r}: a number without a unit at the end")
    return total


def locust_command(
    *,
    grpc_url: str,
    http_url: str,
    repo: str | Path,
    out: str | Path,
    protocol: str = "both",
    users: int | None = None,
    spawn_rate: float | None = None,
    run_time: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    out = Path(out)
    cmd = [sys.executable, "-m", "locust", "--config", str(LOCUST_CONF), "-f", str(LOCUSTFILE)]
    cmd += ["--headless", "--grpc-url", grpc_url, "--http-url", http_url, "--repo", str(repo)]
    cmd += ["--csv", str(out / "locust"), "--html", str(out / "locust.html")]
    if users is not None:
        cmd += ["--users", str(users)]
    if spawn_rate is not None:
        cmd += ["--spawn-rate", str(spawn_rate)]
    if run_time is not None:
        cmd += ["--run-time", run_time]
    return cmd + list(extra or []) + USER_CLASSES[protocol]


def spawn_locust(cmd: list[str], out=None) -> subprocess.Popen:
    """Locust in its own process group (its gevent workers go down with it), from the repo
    root so that `-f loadtest/locustfile.py` resolves; output to `out` (a binary file)."""
    # SIGTERM when we die: Locust stops its users and writes what it has.
    return procs.spawn(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        stdin=subprocess.DEVNULL,
        cwd=str(HERE.parent),
    )


def kill_group(proc: subprocess.Popen) -> int:
    """SIGKILL Locust's process group and reap it."""
    procs.kill_group(proc.pid)
    return proc.wait()


def run_locust(cmd: list[str], *, timeout_s: float, log_path: Path | None = None) -> int:
    """Run Locust in its own process group; SIGKILL the group at the hard timeout."""
    out = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed below
    try:
        proc = spawn_locust(cmd, out)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("locust still running after %.0f s: killing it", timeout_s)
            kill_group(proc)
            return TIMEOUT_EXIT
        except BaseException:  # Ctrl-C: take Locust down with us
            kill_group(proc)
            raise
    finally:
        if out:
            out.close()


def prepare_repo(args) -> Path:
    if args.repo:
        return Path(args.repo)
    if args.tiny:
        shape = catalogue.TINY_SHAPE
    else:
        shape = catalogue.CatalogueShape(n_items=args.items, n_users=args.n_users)
    br = catalogue.build(shape, args.cache)
    catalogue.write_serving_configs(br.repo, layout.RetrievalServing(), layout.RecommendServing())
    return br.repo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    p.add_argument("--repo", help="serve this model repository (default: a cached catalogue)")
    p.add_argument("--items", type=int, default=100_000, help="catalogue size without --repo")
    p.add_argument("--n-users", type=int, default=20_000, help="known users without --repo")
    p.add_argument("--tiny", action="store_true", help="a tiny catalogue (tests, smoke runs)")
    p.add_argument("--cache", default=None, help="where catalogues are cached")
    p.add_argument("--out", default="reports/loadtest")
    p.add_argument("--protocol", choices=sorted(USER_CLASSES), default="both")
    p.add_argument("--users", type=int, default=None, help="Locust users (locust.conf: 16)")
    p.add_argument("--spawn-rate", type=float, default=None)
    p.add_argument("--run-time", default=None, help="e.g. 30s (locust.conf: 30s)")
    p.add_argument("--timeout", type=float, default=None, help="hard kill (run time + 90 s)")
    p.add_argument("--no-feedback", action="store_true", help="no event log, no feedback model")
    p.add_argument("locust_args", nargs="*", help="after --: passed to locust as they are")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repo = prepare_repo(args)
    event_log = None
    if not args.no_feedback and (repo / FEEDBACK_MODEL / layout.CONFIG_FILE).exists():
        event_log = out / "events.db"
        for suffix in ("", "-wal", "-shm"):  # a fresh log per run
            Path(f"{event_log}{suffix}").unlink(missing_ok=True)
    run_time = args.run_time or "30s"
    timeout_s = args.timeout or parse_run_time(run_time) + 90
    server_cfg = ServerConfig.on_free_ports(
        str(repo),
        log_file=str(out / "tritonserver.log"),
        event_log=str(event_log) if event_log else None,
    )
    env_log = os.environ.pop("NORTHSTAR_EVENT_LOG", None) if event_log is None else None
    try:
        with TritonServer(server_cfg) as server:
            log.info("tritonserver ready: gRPC %s, HTTP %s", server.grpc_url, server.http_url)
            cmd = locust_command(
                grpc_url=server.grpc_url,
                http_url=server.http_url,
                repo=repo,
                out=out,
                protocol=args.protocol,
                users=args.users,
                spawn_rate=args.spawn_rate,
                run_time=args.run_time,
                extra=args.locust_args,
            )
            log.info("running: %s", " ".join(cmd))
            t0 = time.monotonic()
            rc = run_locust(cmd, timeout_s=timeout_s)
            log.info("locust exited with %d after %.0f s", rc, time.monotonic() - t0)
    finally:
        if env_log is not None:
            os.environ["NORTHSTAR_EVENT_LOG"] = env_log
    print(f"reports: {out}/locust_stats.csv, {out}/locust.html; server log {out}/tritonserver.log")
    return rc


if __name__ == "__main__":
    sys.exit(main())
