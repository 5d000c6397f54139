"""`northstar monitor`'s HTTP server: /metrics, the Alertmanager webhook, the reports.

    GET  /metrics                        the latest `diagnose.monitor.compute` snapshot
    POST /alerts                         an Alertmanager webhook payload: each firing alert
                                         starts a diagnosis of its window in the background
    GET  /reports/latest                 -> the newest finished report.html
    GET  /reports/alert/<name>/report.html  the newest finished report for that alert
    GET  /reports/<id>                   the job's status.json (running | done | error)
    GET  /reports/<id>/<file>            report.html, report.json, report.md

A thread recomputes the snapshot every `interval` seconds; a scrape never waits for it.
Diagnoses run one at a time on a worker thread, so a storm of alerts queues rather than
starving the scrapes.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.files import atomic_write_text
from diagnose.config import DiagnoseConfig, iso
from diagnose.monitor import HOUR_S, METRICS, MonitorConfig, Snapshot, compute
from diagnose.run import diagnose

log = logging.getLogger(__name__)
STATUS = "status.json"
REPORT_FILES = {"report.html": "text/html", "report.json": "application/json"}
REPORT_FILES["report.md"] = "text/markdown"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


class _Collector:
    """Yields the current snapshot's families (prometheus_client custom collector)."""

    def __init__(self, server: MonitorServer):
        self.server = server

    def collect(self):
        snap, extra = self.server.snapshot, self.server.counters()
        rows = [*snap.samples, *extra]
        for name, (kind, help_) in METRICS.items():
            mine = [(lab, v) for n, lab, v in rows if n == name]
            if not mine and kind == "gauge":
                continue
            keys = sorted({k for lab, _ in mine for k in lab})
            if kind == "counter":
                fam = CounterMetricFamily(name.removesuffix("_total"), help_, labels=keys)
            else:
                fam = GaugeMetricFamily(name, help_, labels=keys)
            for lab, v in mine:
                fam.add_metric([lab.get(k, "") for k in keys], v)
            yield fam


class MonitorServer:
    """The exporter and webhook; `start()` computes once (bad input raises) then serves."""

    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.snapshot = Snapshot()
        self.errors = 0
        self.last_update = None
        self.diagnoses = {"done": 0, "error": 0}
        self.reports = Path(cfg.reports)
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> MonitorServer:
        self.refresh(raise_errors=True)
        self.reports.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"monitor": self})
        self.httpd = ThreadingHTTPServer((self.cfg.host, self.cfg.port), handler)
        self.httpd.daemon_threads = True
        for target in (self.httpd.serve_forever, self._refresh_loop, self._worker):
            t = threading.Thread(target=target, daemon=True, name=f"monitor-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> MonitorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.httpd is not None, "not started"
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def public_url(self) -> str:
        return self.cfg.public_url.rstrip("/") or self.url

    # ------------------------------------------------------------------ metrics

    def refresh(self, *, raise_errors: bool = False) -> None:
        try:
            snap = compute(self.cfg)
        except Exception:
            if raise_errors:
                raise
            self.errors += 1
            log.exception("monitor: recomputation failed; keeping the previous values")
            return
        self.snapshot = snap
        self.last_update = time.time()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.cfg.interval):
            self.refresh()

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        out = [("northstar_monitor_update_errors_total", {}, float(self.errors))]
        if self.last_update is not None:
            out.append(("northstar_monitor_last_update_timestamp_seconds", {}, self.last_update))
        out += [
            ("northstar_monitor_diagnoses_total", {"status": s}, float(n))
            for s, n in self.diagnoses.items()
        ]
        return out

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ alerts -> diagnose

    def submit(self, payload: dict[str, Any]) -> list[dict[str, str]]:
        """Queue a diagnosis per firing alert of an Alertmanager webhook payload."""
        alerts = payload.get("alerts")
        if not isinstance(alerts, list):
            raise ValueError("expected an Alertmanager webhook payload with an `alerts` list")
        out = []
        for alert in alerts:
            if alert.get("status", "firing") != "firing":
                continue
            name = str(alert.get("labels", {}).get("alertname", "alert"))
            job_id = f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:40]}-{uuid.uuid4().hex[:10]}"
            current, reference = self._window(alert)
            status = {
                "id": job_id,
                "alert": name,
                "labels": alert.get("labels", {}),
                "status": "queued",
                "current": current,
                "reference": reference,
                "submitted": time.time(),
            }
            folder = self.reports / job_id
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / STATUS, json.dumps(status, indent=1))
            self._jobs.put(job_id)
            out.append({"id": job_id, "url": f"{self.public_url}/reports/{job_id}/report.html"})
        return out

    def _window(self, alert: dict[str, Any]) -> tuple[str, str]:
        """(current, reference) for diagnose: the monitor's sliding window ending when the
        alert started (clamped to the data's clock: labels trail the wall clock), and the
        trailing baseline before it, the windows the alert's expression compared."""
        end = self.snapshot.now if math.isfinite(self.snapshot.now) else time.time()
        starts = alert.get("startsAt")
        if starts:
            try:
                t = datetime.fromisoformat(str(starts).replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"startsAt {starts!r}: expected an RFC 3339 time") from None
            if t.tzinfo is None:
                t = t.replace(tzinfo=timezone.utc)
            end = min(end, t.timestamp())
        # the last labelled impression is in the window: end it just after
        end += 1.0
        start = end - self.cfg.window_hours * HOUR_S
        ref_start = start - self.cfg.baseline_hours * HOUR_S
        return f"{iso(start)}/{iso(end)}", f"{iso(ref_start)}/{iso(start)}"

    def _worker(self) -> None:
        while True:
            job_id = self._jobs.get()
            if job_id is None:
                return
            self._run(job_id)

    def _run(self, job_id: str) -> None:
        folder = self.reports / job_id
        status = json.loads((folder / STATUS).read_text())
        status["status"] = "running"
        atomic_write_text(folder / STATUS, json.dumps(status, indent=1))
        try:
            cfg = DiagnoseConfig(
                labels=self.cfg.labels,
                out=str(folder),
                current=status["current"],
                reference=status["reference"],
                log=self.cfg.log,
                data=self.cfg.data,
                drift_engine=self.cfg.drift_engine,
            )
            result = diagnose(cfg, progress=False)
            status.update(
                status="done",
                headline=result.summary["headline"],
                top_cause=result.summary["top_cause"],
            )
            self.diagnoses["done"] += 1
        except Exception as exc:  # the job's status says why; the server keeps serving
            log.exception("diagnosis %s failed", job_id)
            status.update(status="error", error=f"{type(exc).__name__}: {exc}")
            self.diagnoses["error"] += 1
        status["finished"] = time.time()
        atomic_write_text(folder / STATUS, json.dumps(status, indent=1, default=str))

    def status(self, job_id: str) -> dict[str, Any] | None:
        path = self.reports / job_id / STATUS
        return json.loads(path.read_text()) if _ID.match(job_id) and path.exists() else None

    def latest(self, alert: str | None = None) -> str | None:
        """The newest finished job (for `alert` when given)."""
        best = None
        for path in self.reports.glob(f"*/{STATUS}"):
            try:
                s = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if s.get("status") != "done" or (alert and s.get("alert") != alert):
                continue
            if best is None or s.get("finished", 0) > best.get("finished", 0):
                best = s
        return best["id"] if best else None


class _Handler(BaseHTTPRequestHandler):
    monitor: MonitorServer

    def log_message(self, fmt: str, *args) -> None:
        log.debug("monitor http: " + fmt, *args)

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, default=str).encode(), "application/json")

    def do_GET(self) -> None:
        m = self.monitor
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            self._send(200, m.metrics(), "text/plain; version=0.0.4; charset=utf-8")
            return
        parts = [p for p in path.split("/") if p]
        if parts[:1] != ["reports"] or len(parts) < 2:
            self._json(404, {"error": f"no such path {path or '/'}"})
            return
        if parts[1] in ("latest", "alert"):
            alert = parts[2] if parts[1] == "alert" and len(parts) > 2 else None
            job = m.latest(alert)
            if job is None:
                self._json(404, {"error": "no finished report yet"})
                return
            self._send(302, b"", "text/plain", {"Location": f"/reports/{job}/report.html"})
            return
        status = m.status(parts[1])
        if status is None:
            self._json(404, {"error": f"no report {parts[1]}"})
            return
        if len(parts) == 2:
            self._json(200, status)
            return
        name = parts[2]
        if name not in REPORT_FILES:
            self._json(404, {"error": f"no file {name}; expected one of {sorted(REPORT_FILES)}"})
            return
        if status["status"] != "done":
            self._json(202 if status["status"] != "error" else 500, status)
            return
        body = (m.reports / parts[1] / name).read_bytes()
        self._send(200, body, REPORT_FILES[name] + "; charset=utf-8")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0].rstrip("/") != "/alerts":
            self._json(404, {"error": f"no such path {self.path}"})
            return
        n = int(self.headers.get("Content-Length") or 0)
        try:
            payload = json.loads(self.rfile.read(n) or b"{}")
            jobs = self.monitor.submit(payload)
        except (ValueError, AttributeError) as exc:
            self._json(400, {"error": str(exc)})
            return
        self._json(202, {"reports": jobs})


def serve(cfg: MonitorConfig) -> int:
    """Run until interrupted (`northstar monitor`)."""
    with MonitorServer(cfg) as server:
        print(f"monitor: {server.url}/metrics; alerts webhook {server.url}/alerts", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
