"""Retrain cycles in the closed loop, with live online features and with frozen snapshots.

    northstar freshness-cycles --preset small --cycles 5 --dir reports/freshness

For each arm (`frozen`: per-version feature snapshots; `live`: the shared online store on
a real redis-server, seeded from the world's dataset), on its own real tritonserver and
event log, with the same world, run and simulator seed: closed-loop traffic runs in the
background the whole time (`loadtest.scenario.Traffic`), and `cycles` times in a row a
retrain (the demo's settings: production's weights fine-tuned on the newest 60 days + the
feedback, `warm_window`; offline gates; a 50% canary) is tested online and its decision
applied (`loadtest.scenario.run_act`). Per cycle it reports the incumbent's and the
canary's CTR at the deciding look (canary.online's user-level test, with its z), the
decision, and the north star of all the traffic served during the cycle (CTR, Wilson 95%;
engaged value per impression), joined from the event log with every window closed, and
beside it the CTR the world's oracle gets from the same requests (studies.replay).

The A/B without retrains is `northstar simulate freshness` (studies/freshness.py), whose
`prepare_for` and `arm_server` this module reuses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from canary.decide import OfflineGates
from canary.guardrails import GuardrailGates
from canary.online import EvaluateConfig
from canary.pipeline import RetrainConfig
from canary.verdict import OnlineGates
from common.figures import save_png
from fairness.gates import GateConfig
from loadtest.scenario import Traffic, run_act
from simulator import SimulateConfig
from studies.config import CyclesConfig
from studies.freshness import (
    arm_server,
    attainable_per_span,
    fmt,
    join_labels,
    prepare_for,
    served_north_star,
    write_study,
)
from studies.replay import ReplayConfig, run_replay
from training.schema import Dataset
from training.synth import World
from training.train import TrainConfig

log = logging.getLogger(__name__)


def _configs(cfg: CyclesConfig, srv, root: Path, world: Path):
    """The demo's retrain, evaluation and traffic settings (northstar/demo_canary.py) on
    this arm."""

    common = {
        "state_dir": str(root / "canary"),
        "repo": str(srv.repo),
        "url": srv.grpc_url,
        "labels": str(root / "labels"),
        "event_log": str(srv.event_log),
    }
    retrain_cfg = RetrainConfig(
        **common,
        data=str(world),
        mode="warm_window",
        window_days=cfg.window_days,
        train=TrainConfig(
            epochs=cfg.retrain_epochs, lr=cfg.retrain_lr, progress=False, seed=cfg.seed
        ),
        canary_percent=cfg.canary_percent,
        skip_weight=cfg.skip_weight,
        gates=OfflineGates(min_metric_ratio=0.9),
        fairness=GateConfig(max_gap=None, min_ratio=None, max_group_drop=0.05),
    )
    eval_cfg = EvaluateConfig(
        **common,
        metrics_url=srv.metrics_url,
        gates=OnlineGates(
            min_impressions=cfg.min_impressions,
            max_impressions=cfg.max_impressions,
            guardrails=GuardrailGates(max_p99_ratio=2.0, p99_slack_ms=50.0),
        ),
    )
    sim = SimulateConfig(
        world=str(world),
        users=cfg.users,
        requests=cfg.batch,
        url=srv.grpc_url,
        protocol="grpc",
        k=cfg.k,
        concurrency=cfg.concurrency,
        seed=cfg.seed + 1000,
        request_id_share=1.0,
    )
    return retrain_cfg, eval_cfg, sim


def _cycle_row(i: int, act: dict[str, Any]) -> dict[str, Any]:
    """What the cycle decided, and on which numbers (the deciding look)."""
    r = act["retrain"]
    looks = act.get("looks") or []
    last = looks[-1] if looks else {}
    prod, can, test = (
        last.get("production") or {},
        last.get("canary") or {},
        last.get("ctr_test") or {},
    )
    return {
        "cycle": i,
        "retrain": r["status"],
        "retrain_reasons": r["reasons"],
        "incumbent": prod.get("version"),
        "candidate": r["version"],
        "incumbent_ctr": prod.get("ctr"),
        "canary_ctr": can.get("ctr"),
        "incumbent_impressions": prod.get("impressions"),
        "canary_impressions": can.get("impressions"),
        "diff": test.get("diff"),
        "z": test.get("z"),
        "ci": [test.get("ci_low"), test.get("ci_high")],
        "looks": len(looks),
        "decision": act.get("decision") or ("none" if r["status"] != "canary" else "undecided"),
        "reason": (last.get("reasons") or [""])[0],
        "seconds": act.get("seconds"),
    }


def _control_row(i: int) -> dict[str, Any]:
    """A cycle of the control: production (version 1) served it alone, nothing retrained."""
    act = {
        "retrain": {"status": "none (control)", "reasons": [], "version": None},
        "decision": "control",
    }
    row = _cycle_row(i, act)
    row.update(incumbent=1, reason="no retrain: production serves every cycle")
    return row


def run_arm(cfg: CyclesConfig, name: str, world: Path, run: Path) -> dict[str, Any]:
    root = Path(cfg.dir) / f"cycles-{name}"
    t0 = time.perf_counter()
    cycles: list[dict[str, Any]] = []
    spans: list[tuple[int, int]] = []
    with arm_server(
        root, run, live=name == "live", world=world, k=cfg.k, overfetch=cfg.overfetch
    ) as srv:
        retrain_cfg, eval_cfg, sim = _configs(cfg, srv, root, world)
        with Traffic(sim) as traffic:
            # Production alone; waits for the requests, however long a loaded machine takes.
            traffic.wait_requests(cfg.burn_in_requests, timeout_s=3600 + cfg.burn_in_requests)
            if traffic.requests < cfg.burn_in_requests:
                raise RuntimeError(
                    f"burn-in: {traffic.requests} of {cfg.burn_in_requests} requests served"
                )
            spans.append((0, len(traffic.reports)))
            for i in range(1, cfg.cycles + 1):
                start = len(traffic.reports)
                if cfg.control_requests:
                    traffic.wait_requests(cfg.control_requests, timeout_s=3600)
                    spans.append((start, len(traffic.reports)))
                    cycles.append(_control_row(i))
                    continue
                act = run_act(
                    f"{name}-{i}",
                    traffic,
                    retrain_cfg,
                    eval_cfg,
                    max_looks=cfg.max_looks,
                    requests_per_look=cfg.requests_per_look,
                )
                spans.append((start, len(traffic.reports)))
                row = _cycle_row(i, act)
                cycles.append(row)
                log.info(
                    "%s cycle %d/%d: v%s %s vs v%s %s -> %s (%s s)",
                    name,
                    i,
                    cfg.cycles,
                    row["incumbent"],
                    fmt(row["incumbent_ctr"]),
                    row["candidate"],
                    fmt(row["canary_ctr"]),
                    row["decision"],
                    row["seconds"],
                )
        reports = list(traffic.reports)
        labels = join_labels(srv.event_log, root / "labels-final", sim.window_s)
    burn_in = {"cycle": 0, "decision": "burn-in", "incumbent": 1}
    ceiling = _attainable(cfg, world, labels, [reports[a:b] for a, b in spans], sim)
    for row, (a, b), best in zip([burn_in, *cycles], spans, ceiling, strict=True):
        row["attainable_ctr"] = best
        reps = reports[a:b]
        ids = pd.Index([rid for r in reps for rid in r.request_ids]).unique()
        lab = labels[labels["request_id"].isin(ids)]
        ns = served_north_star(lab)
        row["served"] = ns[0] if ns else None
        row["served_by_version"] = served_north_star(lab, by=["model_version"])
        shown = sum(r.items_returned for r in reps)
        row["served_requests"] = sum(r.requests for r in reps)
        row["reshown_clicked_share"] = (
            sum(r.rewatch_impressions for r in reps) / shown if shown else math.nan
        )
    if cfg.oracle_replay:
        rows = [burn_in, *cycles]
        served = [r["served_requests"] for r in rows]
        replayed = _oracle_replay(cfg, world, run, sim, served, root / "replay.json")
        for row, rep in zip(rows, replayed, strict=True):
            row["oracle_replay"] = rep
    return {
        "arm": name,
        "online_store": name == "live",
        "burn_in": burn_in,
        "requests": traffic.requests,
        "failed": traffic.failed,
        "retried": traffic.retries,
        "traffic_errors": traffic.errors,
        "cycles": cycles,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _attainable(cfg: CyclesConfig, world: Path, labels, spans, sim) -> list[float]:
    """Per span of traffic reports: the oracle slate's expected CTR for its users, after the
    clicks logged before it (studies.freshness.attainable_per_span). It says how much of a
    fall across cycles any ranking would share: users use up their best items."""

    ids = [[rid for r in reps for rid in r.request_ids] for reps in spans]
    return attainable_per_span(
        World.load(world),
        Dataset.load(world),
        labels,
        ids,
        k=cfg.k,
        rewatch_factor=sim.rewatch_factor,
    )


def _oracle_replay(cfg: CyclesConfig, world: Path, run: Path, sim, requests: list[int], out):
    """Per span: the oracle's CTR (Wilson 95%) and clicks per request on the same requests,
    replayed in-process from the traffic's seeds (None for a span without requests)."""

    res = run_replay(
        ReplayConfig(
            world=str(world),
            run=str(run),
            spans=tuple(n for n in requests if n > 0),
            seed=sim.seed,
            users=sim.users,
            batch=sim.requests,
            k=cfg.k,
            overfetch=cfg.overfetch,
            policies=("oracle",),
            out=str(out),
        )
    )
    keep = ("requests", "ctr", "ctr_low", "ctr_high", "clicks_per_request")
    rows = iter(res["policies"]["oracle"])
    # spans without requests were not replayed: they take no row
    return [{k: v for k, v in next(rows).items() if k in keep} if n else None for n in requests]


def run_cycles(cfg: CyclesConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    world, run = prepare_for(cfg)
    arms = {}
    load = []
    for name in cfg.arms:
        arms[name] = run_arm(cfg, name, world, run)
        load.append(list(os.getloadavg()))
    return write_study(cfg, world, run, arms, load, t0, "cycles.json")


def merge_results(paths: list[str]) -> dict[str, Any]:
    """One result with the arms of several results files (runs of one arm each)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    arms = {
        _label(name, part["config"]): arm for part in parts for name, arm in part["arms"].items()
    }
    load = [la for part in parts for la in part["load_average"]]
    seconds = max(part["seconds"] for part in parts)
    return {**parts[0], "arms": arms, "load_average": load, "seconds": seconds}


def _per_request(span: dict[str, Any]) -> str:
    """Items shown per answered request. Below k, the seen filter left slates short: those
    users are under-represented in per-impression figures, so read them beside this."""
    n, served = span.get("served_requests"), span.get("served") or {}
    return fmt(served["impressions"] / n, ".2f") if n and served.get("impressions") else "n/a"


def _oracle(span: dict[str, Any]) -> str:
    """The oracle's CTR [95% Wilson] on the span's requests, replayed (n/a: not run)."""
    o = span.get("oracle_replay")
    if not o:
        return "n/a"
    return f"{fmt(o['ctr'])} [{fmt(o['ctr_low'])}, {fmt(o['ctr_high'])}]"


def _label(arm: str, cfg: dict[str, Any]) -> str:
    """The arm's name in a merged result: a control or a non-default overfetch says so, so
    that runs of one arm with other settings stay apart."""
    label = arm
    if cfg.get("control_requests"):
        label += " (no retrain)"
    if cfg.get("overfetch", 100) != 100:
        label += f", overfetch {cfg['overfetch']}"
    return label


def cycles_table(result: dict[str, Any]) -> str:
    lines = [
        "| arm | cycle | incumbent CTR | canary CTR | diff [95% CI], z | decision | "
        "served CTR [95% Wilson] | served value / imp | items / request | "
        "re-shown clicked | best attainable CTR | oracle on the same requests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, arm in result["arms"].items():
        b = arm.get("burn_in")
        if b and b.get("served"):
            s = b["served"]
            lines.append(
                f"| {name} | 0 (burn-in, {b['served_requests']:,} requests) | – | – | – | – | "
                f"{fmt(s.get('ctr'))} [{fmt(s.get('ctr_low'))}, {fmt(s.get('ctr_high'))}] | "
                f"{fmt(s.get('value_per_impression'), '.2f')} | {_per_request(b)} | "
                f"{100 * b['reshown_clicked_share']:.2f}% | {fmt(b.get('attainable_ctr'))} | "
                f"{_oracle(b)} |"
            )
        for c in arm["cycles"]:
            s = c.get("served") or {}
            lo, hi = c["ci"]
            candidate = (
                "–" if c["candidate"] is None else f"v{c['candidate']} {fmt(c['canary_ctr'])}"
            )
            lines.append(
                f"| {name} | {c['cycle']} | v{_incumbent(c)} {fmt(incumbent_ctr(c))} | "
                f"{candidate} | {fmt(c['diff'], '+.4f')} "
                f"[{fmt(lo, '+.4f')}, {fmt(hi, '+.4f')}], z {fmt(c['z'], '.2f')} | "
                f"{c['decision']} | {fmt(s.get('ctr'))} [{fmt(s.get('ctr_low'))}, "
                f"{fmt(s.get('ctr_high'))}] | {fmt(s.get('value_per_impression'), '.2f')} | "
                f"{_per_request(c)} | "
                f"{100 * c['reshown_clicked_share']:.2f}% | {fmt(c.get('attainable_ctr'))} | "
                f"{_oracle(c)} |"
            )
    return "\n".join(lines)


def plot_cycles(result: dict[str, Any], path: str | Path) -> Path:
    """Per cycle: incumbent and canary CTR at the deciding look; the served north star
    (CTR with its Wilson interval) of the traffic during the cycle; per arm."""
    colors = {"frozen": "#c0504d", "live": "#4f81bd"}
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, arm) in enumerate(result["arms"].items()):
        cyc = arm["cycles"]
        x = [c["cycle"] for c in cyc]
        col = colors.get(name, palette[i % len(palette)])
        style = "o--" if "(no retrain)" in name else "o-"
        inc = [incumbent_ctr(c) for c in cyc]
        axes[0].plot(x, inc, style, color=col, label=f"{name}: incumbent")
        axes[0].plot(
            x, [_nan(c["canary_ctr"]) for c in cyc], "s", color=col, alpha=0.6, label="canary"
        )
        for c, y in zip(cyc, inc, strict=True):
            mark = {"promote": "P", "rollback": "R"}.get(c["decision"], "-")
            axes[0].annotate(mark, (c["cycle"], y), textcoords="offset points", xytext=(4, -12))
        s = [c.get("served") or {} for c in cyc]
        y = [_nan(v.get("ctr")) for v in s]
        err = [
            [yy - _nan(v.get("ctr_low")) for yy, v in zip(y, s, strict=True)],
            [_nan(v.get("ctr_high")) - yy for yy, v in zip(y, s, strict=True)],
        ]
        axes[1].errorbar(x, y, yerr=err, fmt=style, capsize=4, color=col, label=name)
        oracle = [(c.get("oracle_replay") or {}).get("ctr") for c in cyc]
        if all(v is not None for v in oracle):
            axes[1].plot(x, oracle, ":", color=col, label=f"{name}: oracle, same requests")
        axes[2].plot(
            x,
            [_nan(v.get("value_per_impression")) for v in s],
            style,
            color=col,
            label=name,
        )
    axes[0].set_title(
        "incumbent vs canary CTR at the deciding look\n(P promote, R rollback, - no canary: "
        "incumbent's served CTR)",
        fontsize=9,
    )
    axes[1].set_title("served CTR per cycle (95% Wilson; dotted: oracle)", fontsize=10)
    axes[2].set_title("served engaged value / impression per cycle", fontsize=10)
    for ax in axes:
        ax.set_xlabel("retrain cycle")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def _incumbent(c: dict[str, Any]) -> str:
    """The incumbent's version: at the deciding look, or (no canary) the version that served
    most of the cycle."""
    if c.get("incumbent") is not None:
        return str(c["incumbent"])
    rows = c.get("served_by_version") or []
    return str(max(rows, key=lambda r: r["impressions"])["model_version"]) if rows else "?"


def incumbent_ctr(c: dict[str, Any]) -> float:
    """The incumbent's CTR at the deciding look; in a cycle without a canary, the served CTR
    of the version that served most of the cycle (the incumbent)."""
    if c.get("incumbent_ctr") is not None:
        return float(c["incumbent_ctr"])
    rows = c.get("served_by_version") or []
    if not rows:
        return math.nan
    return _nan(max(rows, key=lambda r: r["impressions"])["ctr"])


def _nan(v) -> float:
    return math.nan if v is None else float(v)
