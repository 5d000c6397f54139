"""`northstar soak` (`make soak`): hours of production in minutes, then the verdict.

Against one real tritonserver, for `duration_s`:
  - the closed-loop simulator (the `simulator` package) sends requests and interactions, with
    retries, in batches; every batch is reconciled against the event log at the end;
  - Locust (gRPC + HTTP users: recommend, retrieval, feedback) logs every request;
  - one canary cycle runs under that load: join -> retrain -> offline gates -> canary in
    Triton -> online evaluations -> promote or roll back, as the verdict says;
  - the RSS of tritonserver and of its Python stubs is sampled.

It reports requests and errors, p50/p99 per minute, RSS growth, and events logged
against events sent (JSON, Markdown, and HTML with plots), and exits non-zero when an
acknowledged event is lost, the error rate or RSS growth is above its threshold, or the
cycle did not reach a verdict that was applied.

The soak follows the online verdict: it evaluates the canary every few seconds with
auto-apply until the verdict decides, so a promote or a rollback happens only when the rules
say so, however slowly a loaded machine gathers the sample. `canary_s` only bounds a hang:
a canary still undecided then is rolled back ("no verdict"), and the report carries every
look. A minute of tiny-world
traffic is a small sample, so the soak's gates (`soak_gates`) use a short horizon and a
wide non-inferiority margin: the soak judges operations (loading, routing, promoting and
unloading under load cost no request, no event and no memory), while the scenario test
and the demo judge the CTR decisions at their real margins. `expect` says which outcome
the soak's healthy canary must reach for the run to pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from canary.guardrails import GuardrailGates
from canary.online import EvaluateConfig, evaluate_canary, rollback
from canary.pipeline import RetrainConfig, retrain
from canary.verdict import OnlineGates
from common.files import atomic_write_text
from common.jsonsafe import dumps
from fairness.gates import GateConfig
from feedback.join import JoinConfig, run_join
from loadtest.run import kill_group, locust_command, spawn_locust
from loadtest.scenario import Traffic
from loadtest.soak_report import write_html, write_markdown
from models.towers import TowerConfig
from serving.publish import ExportConfig, export
from serving.server import ServerConfig, TritonServer
from simulator import SimulateConfig, reconcile_many
from training.synth import SynthConfig, generate_dataset
from training.train import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoakConfig:
    out: str = "reports/soak"
    duration_s: float = 600.0
    preset: str = "tiny"  # the synthetic world (training.synth presets)
    seed: int = 0
    # Traffic. The simulator runs batches back to back; Locust adds steady users.
    sim_requests: int = 100  # slates per simulator batch
    sim_concurrency: int = 2
    locust_users: int = 4
    locust_protocol: str = "both"  # grpc | http | both
    retry_deadline_s: float = 60.0  # simulator retries ride out a version reload
    # The canary cycle starts at this share of the run and is looked at until its verdict.
    cycle_at: float = 0.2
    # A bound on a hang, not a schedule: looks go on until the verdict decides, for at most
    # this long; a canary undecided then is rolled back ("no verdict") and the soak fails.
    canary_s: float = 900.0
    # Traffic goes on at least this long after the promote, whatever duration_s says: the
    # window in which memory after the cycle is measured. The run is extended if needed.
    tail_s: float = 20.0
    canary_percent: int = 50
    look_every_s: float = 4.0  # seconds between online evaluations of the canary
    expect: str = "promote"  # the verdict the cycle must reach: promote | rollback
    train_epochs: int = 2
    sample_every_s: float = 2.0  # RSS sampling period
    # Verdict thresholds.
    max_error_rate: float = 0.001  # failed / all requests, simulator + Locust
    max_rss_growth_pct: float = 25.0  # total RSS after the cycle vs before it

    def __post_init__(self) -> None:
        if self.duration_s < 30:
            raise ValueError(f"duration_s={self.duration_s}; expected >= 30")
        if not 0 < self.cycle_at < 1:
            raise ValueError(f"cycle_at={self.cycle_at}; expected a share in (0, 1)")
        if self.expect not in ("promote", "rollback"):
            raise ValueError(f"expect={self.expect!r}; expected 'promote' or 'rollback'")


# ---------------------------------------------------------------------------- memory


class MemorySampler:
    """RSS of tritonserver and of its child processes (the Python-backend stubs)."""

    def __init__(self, pid: int, every_s: float, t0: float):
        self.proc = psutil.Process(pid)
        self.every_s, self.t0 = every_s, t0
        self.rows: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss", daemon=True)

    def sample(self) -> dict[str, float]:
        server = self.proc.memory_info().rss
        stubs, n = 0, 0
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a stub may exit during a reload
                stubs += child.memory_info().rss
                n += 1
        return {
            "t": time.monotonic() - self.t0,
            "server_mb": server / 2**20,
            "stubs_mb": stubs / 2**20,
            "total_mb": (server + stubs) / 2**20,
            "stubs": n,
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the server may be gone at the very end
                self.rows.append(self.sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def rss_growth(rows: list[dict], before: tuple[float, float], after: tuple[float, float]) -> dict:
    """Median RSS in two windows of the run (seconds from the start), and the growth."""
    df = pd.DataFrame(rows)
    out: dict[str, Any] = {}
    for col in ("server_mb", "total_mb"):
        a = df[(df.t >= before[0]) & (df.t < before[1])][col]
        b = df[(df.t >= after[0]) & (df.t <= after[1])][col]
        if a.empty or b.empty:
            out[col] = None
            continue
        base, end = float(a.median()), float(b.median())
        out[col] = {
            "before_mb": round(base, 1),
            "after_mb": round(end, 1),
            "growth_pct": round(100.0 * (end - base) / base, 2),
        }
    out["windows_s"] = {"before": before, "after": after}
    return out


# ---------------------------------------------------------------------------- latency


def per_minute(requests: pd.DataFrame, t0_wall: float) -> pd.DataFrame:
    """requests (ts, name, ms, ok) -> one row per minute: requests, errors, p50, p99."""
    if requests.empty:
        return pd.DataFrame(columns=["minute", "requests", "errors", "p50_ms", "p99_ms"])
    minute = ((requests["ts"] - t0_wall) // 60).astype(int).clip(lower=0)
    rows = []
    for m, g in requests.groupby(minute):
        ok = g[g["ok"] == 1]["ms"].to_numpy()
        rows.append(
            {
                "minute": int(m),
                "requests": len(g),
                "errors": int((g["ok"] == 0).sum()),
                "p50_ms": float(np.percentile(ok, 50)) if len(ok) else math.nan,
                "p99_ms": float(np.percentile(ok, 99)) if len(ok) else math.nan,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the run


@dataclass
class SoakReport:
    config: dict
    seconds: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    error_rate: float = 0.0
    minutes: list[dict] = field(default_factory=list)
    rss: dict = field(default_factory=dict)
    rss_samples: list[dict] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    cycle: dict[str, Any] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    ok: bool = False


def _setup(cfg: SoakConfig, root: Path):
    """A world, a trained production model exported as version 1, and a live server."""
    data = root / "data"
    world, ds = generate_dataset(SynthConfig.preset(cfg.preset, seed=cfg.seed))
    ds.save(data)
    world.save(data)
    tower = TowerConfig(id_dim=16, cat_dim=4, hidden_dim=32, out_dim=16, dropout=0.0)
    train_cfg = TrainConfig(
        epochs=3, batch_size=256, val_users=1000, threads=2, tower=tower, seed=cfg.seed
    )
    train(replace(train_cfg, data=str(data), out=str(root / "run0"), progress=False))
    repo = root / "model_repository"
    export(ExportConfig(run=str(root / "run0"), repo=str(repo), k=10, overfetch=10))
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            log_file=str(root / "tritonserver.log"),
            event_log=str(root / "events.db"),
        )
    )
    return data, repo, train_cfg, server


def soak_gates():
    """The soak's online gates: a small sample decides, on a wide margin (module docstring).
    The serving guardrails keep their shipped thresholds; group fairness is left to the
    scenario and the demo (a minute of tiny-world traffic gives groups of a few hundred
    impressions, whose CTR ratios are noise)."""
    return OnlineGates(
        min_users=20,
        min_impressions=200,
        max_impressions=400,
        noninferiority_margin=0.5,
        fairness_attributes=(),
        guardrails=GuardrailGates(min_requests=50, min_latency_requests=50),
    )


def _cycle(cfg: SoakConfig, root: Path, server, traffic, train_cfg, t0: float) -> dict:
    """join -> retrain -> canary -> evaluate until the verdict -> apply it, under load."""

    def mark(name: str) -> None:
        out["marks"][name] = round(time.monotonic() - t0, 1)
        print(f"  [{out['marks'][name]:6.1f} s] {name}", flush=True)

    out: dict[str, Any] = {"marks": {}}
    common = {
        "state_dir": str(root / "canary"),
        "repo": str(root / "model_repository"),
        "url": server.grpc_url,
        "labels": str(root / "labels"),
        "drain_s": 1.5,
    }
    mark("retrain started")
    with traffic.lock:  # the join reads a consistent log: every click of a joined slate is in
        run_join(JoinConfig(log=server.event_log, out=common["labels"], as_of=math.inf))
    res = retrain(
        RetrainConfig(
            **common,
            train=replace(train_cfg, epochs=cfg.train_epochs, progress=False),
            k=10,
            overfetch=10,
            exporter="legacy",
            canary_percent=cfg.canary_percent,
            audit_boot=20,
            # The soak is about operations, not model quality: fairness is reported, and
            # only a gross regression (the offline gates' defaults) stops the cycle.
            fairness=GateConfig(max_gap=None, min_ratio=None, max_group_drop=None),
        )
    )
    out["retrain"] = {"status": res.status, "version": res.version, "reasons": res.reasons}
    if res.status != "canary":
        mark(f"retrain {res.status}")
        return out
    mark(f"canary v{res.version} at {cfg.canary_percent}%")
    ecfg = EvaluateConfig(
        **common,
        metrics_url=server.metrics_url,
        event_log=server.event_log,
        auto=True,
        gates=soak_gates(),
    )
    deadline = time.monotonic() + cfg.canary_s
    looks: list[dict] = []
    ev = None
    while True:
        time.sleep(cfg.look_every_s)
        with traffic.lock:  # the join reads a consistent log
            ev = evaluate_canary(ecfg)
        looks.append({"action": ev.action, "reasons": list(ev.verdict.reasons)})
        if ev.action != "continue" or time.monotonic() >= deadline:
            break
    out["looks"] = looks
    if ev.action == "continue":
        why = f"soak: no verdict after {cfg.canary_s:.0f} s of canary ({len(looks)} looks)"
        log.error("%s; last look: %s", why, looks[-1]["reasons"])
        rollback(replace(ecfg, event_log=None), reasons=[why], evidence={"looks": looks})
        out["decision"] = "rollback (no verdict)"
    else:
        out["decision"] = ev.action
    if ev.action == "promote":
        out["promoted"] = res.version
        mark(f"promoted v{res.version}")
    else:
        out["rolled_back"] = res.version
        mark(f"rolled back v{res.version}: {looks[-1]['reasons'][0][:120]}")
    return out


def run_soak(cfg: SoakConfig) -> SoakReport:
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    rep = SoakReport(config=asdict(cfg))
    print(f"soak: setting up a {cfg.preset!r} world, a model and a server in {root}", flush=True)
    data, repo, train_cfg, server = _setup(cfg, root)
    server.start()
    try:
        sim = SimulateConfig(
            world=str(data),
            users=300,
            requests=cfg.sim_requests,
            url=server.grpc_url,
            k=10,
            concurrency=cfg.sim_concurrency,
            seed=cfg.seed + 1,
            request_id_share=1.0,
            retry_deadline_s=cfg.retry_deadline_s,
        )
        request_log = root / "requests.csv"
        locust_cmd = locust_command(
            grpc_url=server.grpc_url,
            http_url=server.http_url,
            repo=repo,
            out=root,
            protocol=cfg.locust_protocol,
            users=cfg.locust_users,
            spawn_rate=cfg.locust_users,
            # Stopped by us (SIGTERM) when the soak ends, which may be after duration_s.
            run_time=f"{int(cfg.duration_s * 3 + 3600)}s",
            # The soak judges errors and latency itself, from every request.
            extra=[
                *("--request-log", str(request_log)),
                *("--max-p99-ms", "1e9", "--max-fail-ratio", "1"),
            ],
        )
        t0, t0_wall = time.monotonic(), time.time()
        print(f"soak: {cfg.duration_s:.0f} s of traffic", flush=True)
        with (
            MemorySampler(server.process.pid, cfg.sample_every_s, t0) as mem,
            Traffic(sim) as traffic,
            _Locust(locust_cmd, root / "locust.log") as locust,
        ):
            time.sleep(max(0.0, cfg.cycle_at * cfg.duration_s))
            try:
                rep.cycle = _cycle(cfg, root, server, traffic, train_cfg, t0)
            except Exception as exc:  # reported, and the verdict fails on it
                log.exception("canary cycle failed")
                rep.cycle = {**rep.cycle, "error": f"{type(exc).__name__}: {exc}"}
            end = max(cfg.duration_s, time.monotonic() - t0 + cfg.tail_s)
            while (left := end - (time.monotonic() - t0)) > 0:
                print(f"  [{time.monotonic() - t0:6.1f} s] {traffic.requests} simulator "
                      f"requests, {left:.0f} s left", flush=True)  # fmt: skip
                time.sleep(min(30.0, left))
        locust_rc = locust.returncode
        rep.seconds = round(time.monotonic() - t0, 1)
        rep.rss_samples = mem.rows
        marks = rep.cycle.get("marks", {})
        start = marks.get("retrain started", cfg.cycle_at * cfg.duration_s)
        decided = next(
            (t for k, t in marks.items() if k.startswith(("promoted", "rolled back"))), None
        )
        after0 = (decided or rep.seconds) + 5.0
        rep.rss = rss_growth(mem.rows, (min(5.0, start / 2), start), (after0, rep.seconds))

        # Events: every simulator batch against the log.
        print(f"soak: reconciling {len(traffic.reports)} simulator batches", flush=True)
        rec = reconcile_many(
            traffic.reports, log_path=server.event_log, labels_dir=str(root / "labels-check")
        )
        rep.events = {
            "batches": len(rec),
            "sent": sum(r.events_sent for r in traffic.reports),
            "resent_on_purpose": sum(r.resent for r in traffic.reports),  # at-least-once
            "send_failed_batches": sum(r.send_failed_batches for r in traffic.reports),
            "acknowledged": sum(x["interactions_accepted"] for x in rec),
            "logged": sum(x["interactions_in_log"] for x in rec),
            "impressions_returned": sum(x["items_returned"] for x in rec),
            "impressions_logged": sum(x["impressions_logged"] for x in rec),
            "batches_reconciled_ok": sum(bool(x["ok"]) for x in rec),
        }
        reqs = _read_requests(request_log)
        minutes = per_minute(reqs, t0_wall)
        # Locust's last requests finish after the end; a minute that starts there is noise.
        rep.minutes = minutes[minutes["minute"] * 60 < rep.seconds].to_dict("records")
        rep.requests = {
            "locust": len(reqs),
            "locust_failed": int((reqs["ok"] == 0).sum()) if len(reqs) else 0,
            "simulator": traffic.requests,
            "simulator_failed": traffic.failed,
            "simulator_retries": traffic.retries,
            "locust_exit_code": locust_rc,
        }
        total = rep.requests["locust"] + rep.requests["simulator"]
        failed = rep.requests["locust_failed"] + rep.requests["simulator_failed"]
        rep.error_rate = failed / total if total else 1.0
    finally:
        server.stop()
    rep.checks = _checks(cfg, rep)
    rep.ok = all(c["ok"] for c in rep.checks)
    return rep


class _Locust:
    """Locust headless in its own process group, stopped with SIGTERM (a graceful quit: it
    writes its CSV and HTML), killed if it does not leave in time."""

    def __init__(self, cmd: list[str], log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self) -> _Locust:
        self._log = open(self.log_path, "wb")
        self.proc = spawn_locust(self.cmd, self._log)
        return self

    def __exit__(self, *exc) -> None:
        proc = self.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.error("locust did not stop within 60 s of SIGTERM: killing it")
            self.returncode = kill_group(proc)
        self._log.close()


def _read_requests(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["ts", "name", "ms", "ok"])
    return pd.read_csv(path)


def _checks(cfg: SoakConfig, rep: SoakReport) -> list[dict]:
    ev, growth = rep.events, rep.rss.get("total_mb")
    lost = ev.get("acknowledged", 0) - ev.get("logged", 0)
    return [
        {
            "name": "no acknowledged event lost or doubled",
            "ok": lost == 0 and ev.get("batches_reconciled_ok") == ev.get("batches"),
            "text": f"{ev.get('acknowledged')} acknowledged, {ev.get('logged')} in the log; "
            f"{ev.get('batches_reconciled_ok')}/{ev.get('batches')} batches reconcile",
        },
        {
            "name": "error rate",
            "ok": rep.error_rate <= cfg.max_error_rate,
            "text": f"{rep.error_rate:.5f} (max {cfg.max_error_rate})",
        },
        {
            "name": "RSS growth (server + stubs)",
            "ok": growth is not None and growth["growth_pct"] <= cfg.max_rss_growth_pct,
            "text": "no samples in a window"
            if growth is None
            else f"{growth['before_mb']} -> {growth['after_mb']} MB, {growth['growth_pct']:+.1f}% "
            f"(max {cfg.max_rss_growth_pct}%)",
        },
        {
            "name": f"retrain -> canary -> {cfg.expect} (the online verdict) under load",
            "ok": rep.cycle.get("decision") == cfg.expect,
            "text": json.dumps(rep.cycle.get("marks", {}))
            + (f"; error: {rep.cycle['error']}" if rep.cycle.get("error") else "")
            + _cycle_seen(rep.cycle, cfg.expect),
        },
    ]


def _cycle_seen(cycle: dict, expect: str) -> str:
    """What the cycle saw, when it did not reach `expect`: the retrain's outcome and every
    look's action and first reason, so a failed soak says why without a rerun."""
    if cycle.get("decision") == expect:
        return ""
    retrain = cycle.get("retrain", {})
    parts = [f"; decision {cycle.get('decision')!r}, retrain {retrain.get('status')!r}"]
    parts += [f" {r}" for r in retrain.get("reasons", [])[:3]]
    for i, look in enumerate(cycle.get("looks", []), 1):
        parts.append(f"; look {i}: {look['action']}: {(look['reasons'] or [''])[0][:300]}")
    return "".join(parts)


def write_reports(rep: SoakReport, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": out / "soak.json", "md": out / "soak.md", "html": out / "soak.html"}
    # NaN (a minute without requests has no p99) is null; anything odd in `cycle` is text.
    atomic_write_text(paths["json"], dumps(rep, indent=1, default=str))
    write_markdown(rep, paths["md"])
    write_html(rep, paths["html"])
    return paths
