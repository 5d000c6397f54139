"""`northstar demo`: the whole loop on the embedded defaults, end to end.

synthetic world -> train -> evaluate (model beside TopPop) -> export to the
Triton model repository -> a real `tritonserver` -> recommendations over gRPC
and HTTP -> later stages (feedback, audit, canary) as they are registered
in STAGES -> one self-contained HTML page of the loop (`northstar.loop_page`).
The first stages reuse what an earlier run of the demo left behind when their inputs
have not changed. Every step prints its wall time as it ends; the page lists them all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from common import config as config_mod
from northstar.demo_canary import canary_stage
from northstar.loop_page import write_loop_page


@dataclass(frozen=True)
class DemoConfig:
    """`northstar demo --config FILE` (a [demo] table or top level) and `--set KEY=VALUE`;
    the flags are shorthands for some fields. These defaults are the only ones."""

    dir: str = "demo"  # everything the demo writes lives here
    preset: str = "demo"  # synth world size: tiny | small | demo | large
    # The Triton model repository; empty = DIR/model_repository. The demo's own, so a
    # second run starts its loop from version 1 instead of serving what the last one
    # promoted (export without --url only publishes once a repository has routing).
    repo: str = ""
    seed: int = 0
    show_users: int = 3  # users whose recommendations are printed, plus one unknown user
    k: int = 10
    sim_users: int = 2000  # simulated population drawn from the world
    sim_requests: int = 4000  # slates requested by the simulator
    # Training of the production model: one model (no logit-adjustment grid; that is
    # `northstar train --grid` or `northstar tune`), stopped after this many epochs (or
    # earlier by patience). Most of the offline lift is there after the first epochs.
    train_epochs: int = 2
    # torch intra-op threads for that training; 0 = torch's default (every core). One by
    # default: torch's OpenMP workers spin-wait, so on a box whose cores are shared with
    # other work more threads than free cores cost far more than they give.
    train_threads: int = 1


@dataclass
class Clock:
    """Wall seconds of each demo step: printed as a step ends, kept for the loop page."""

    steps: dict[str, float] = field(default_factory=dict)
    _name: str | None = None
    _t: float = 0.0

    def step(self, title: str) -> None:
        self.stop()
        print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
        self._name, self._t = title, time.perf_counter()

    def stop(self) -> None:
        if self._name is not None:
            secs = time.perf_counter() - self._t
            self.steps[self._name] = round(secs, 1)
            print(f"--- {self._name.split('.')[0]}. took {secs:.1f} s", flush=True)
        self._name = None


# What one demo run's loop writes. The world (data/) and the trained model (run/) are
# reused when their settings match; everything the loop grows from them starts anew, so
# every run shows the same acts from the same start.
LOOP_STATE = (
    "events.db",
    "events.db-wal",
    "events.db-shm",
    "labels",
    "canary",
    "reports",
    "north_star.json",
    "canary_scenario.json",
    "loop.html",
)


def fresh_loop(root: Path, own_repo: Path | None) -> None:
    """Remove the last run's loop state under `root`, and its model repository when it is
    the demo's own (a repository named with --repo is the user's and is left alone)."""
    for name in LOOP_STATE:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if own_repo is not None and own_repo.exists():
        shutil.rmtree(own_repo)


def run_demo(cfg: DemoConfig) -> int:
    # Heavy imports here, not at the top: `northstar --help` imports this module.
    from loadtest.scenario import unexpected
    from serving.client import RecommenderClient
    from serving.publish import ExportConfig, export
    from serving.server import ServerConfig, TritonServer
    from training.evaluate import format_table
    from training.run import METRICS_FILE
    from training.synth import SynthConfig, generate_dataset
    from training.train import TrainConfig, train

    root = Path(cfg.dir)
    data, run = root / "data", root / "run"
    repo = Path(cfg.repo) if cfg.repo else root / "model_repository"
    fresh_loop(root, repo if not cfg.repo else None)
    cfg = replace(cfg, repo=str(repo))
    t0 = time.perf_counter()
    clock = Clock()

    clock.step(f"1. synthetic world ({cfg.preset})")
    synth = SynthConfig.preset(cfg.preset, seed=cfg.seed)
    marker = data / "synth.json"
    if marker.exists() and json.loads(marker.read_text()) == {
        "preset": cfg.preset,
        "seed": cfg.seed,
    }:
        print(f"reusing {data}")
    else:
        world, ds = generate_dataset(synth, progress=True)
        ds.save(data)
        world.save(data)
        marker.write_text(json.dumps({"preset": cfg.preset, "seed": cfg.seed}))
        print(f"{len(ds.users)} users, {len(ds.items)} items, {len(ds.interactions)} interactions")

    clock.step("2. train the two-tower model once (resumes from its checkpoint)")
    if (run / METRICS_FILE).exists() and (run / "model.pt").exists():
        print(f"reusing {run} (delete it to retrain)")
        metrics = json.loads((run / METRICS_FILE).read_text())
    else:
        metrics = train(
            TrainConfig(
                data=str(data),
                out=str(run),
                seed=cfg.seed,
                epochs=cfg.train_epochs,
                threads=cfg.train_threads,
            )
        )
    clock.step("3. offline evaluation: model beside TopPop")
    print(format_table({s: metrics[s] for s in ("val", "test")}))
    lift = metrics["test"]["model"]["ndcg@10"] / max(metrics["test"]["toppop"]["ndcg@10"], 1e-12)
    print(f"test NDCG@10 lift over TopPop: {lift:.2f}x; trained in {metrics['train_seconds']} s")

    clock.step("4. export to ONNX -> Triton model repository (parity-checked)")
    res = export(ExportConfig(run=str(run), repo=cfg.repo, k=100))
    print(
        f"version {res.version} at {res.path}; parity max |Δscore| "
        f"{res.parity.max_score_diff:.1e} on {res.parity.users} users"
    )

    clock.step("5. serve on a real tritonserver; recommend over gRPC and HTTP")
    # lazy: `northstar --help` imports this module
    import numpy as np

    # lazy: `northstar --help` imports this module
    import pandas as pd

    users = pd.read_parquet(data / "users.parquet")["user_id"].to_numpy()
    rng = np.random.default_rng(cfg.seed)
    picks = [int(u) for u in rng.choice(users, cfg.show_users, replace=False)]
    picks.append(int(users.max()) + 10_000)  # nobody: a cold start
    server_cfg = ServerConfig.on_free_ports(cfg.repo, event_log=str(root / "events.db"))
    with TritonServer(server_cfg) as server:
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}")
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with RecommenderClient(url, protocol) as client:
                recs = client.recommend(picks, k=cfg.k)
            print(f"\n[{protocol}] top-{cfg.k} per user")
            for r in recs:
                tag = " (cold start)" if r.cold_start else ""
                items = " ".join(str(i) for i in r.item_ids[: cfg.k])
                print(f"  user {r.user_id:>7} v{r.model_version}{tag}: {items}")
        for stage in STAGES:
            clock.step(TITLES.get(stage) or (stage.__doc__ or stage.__name__).splitlines()[0])
            stage(cfg, server, root)
    clock.step("10. the loop on one page")
    page = write_loop_page(root, steps=clock.steps)
    print(f"wrote {page}")
    clock.stop()
    total = time.perf_counter() - t0
    per_step = ", ".join(f"{t.split('.')[0]}. {s:.0f} s" for t, s in clock.steps.items())
    print(f"\nwall time per step: {per_step}")
    print(f"demo finished in {total:.0f} s; outputs under {root}/; the loop: {page}")
    scenario = root / "canary_scenario.json"
    acts = json.loads(scenario.read_text())["acts"] if scenario.exists() else {}
    wrong = unexpected(acts) if acts else {"canary": "did not run"}
    if wrong:
        print(f"demo: not every act ended as it should: {wrong}")
        return 1
    return 0


def feedback_stage(cfg: DemoConfig, server, root: Path) -> None:
    """Simulated users click by the world's ground truth; join; north-star table."""
    # lazy: `northstar --help` imports this module
    import pandas as pd

    from feedback.join import JoinConfig, read_labels, run_join
    from feedback.metrics import compute_metrics, format_metrics
    from simulator import SimulateConfig, simulate

    sim = SimulateConfig(
        world=str(root / "data"),
        users=cfg.sim_users,
        requests=cfg.sim_requests,
        url=server.grpc_url,
        protocol="grpc",
        seed=cfg.seed,
        k=cfg.k,
    )
    rep = simulate(sim)
    print(
        f"{rep.requests_ok}/{rep.requests} slates served ({rep.requests_failed} failed), "
        f"{rep.items_returned} impressions, {rep.clicks} clicks, {rep.accepted} events acked"
    )
    join = run_join(
        JoinConfig(log=server.event_log, out=str(root / "labels"), window_s=sim.window_s)
    )
    print(f"join: {json.dumps(join.to_dict())}")
    labels = read_labels(root / "labels")
    users = pd.read_parquet(root / "data" / "users.parquet")
    report = compute_metrics(labels, users=users)
    (root / "north_star.json").write_text(json.dumps(report, indent=1, default=str))
    print(format_metrics(report))
    print(f"wrote {root / 'north_star.json'}")


def audit_stage(cfg: DemoConfig, server, root: Path) -> None:
    """Fairlearn audit of the trained model on its test period: users and items."""
    # lazy: `northstar --help` imports this module
    from fairness.audit import AuditConfig, run_audit
    from fairness.gates import check_gates
    from fairness.report import write_report

    result = run_audit(AuditConfig(run=str(root / "run"), data=str(root / "data")))
    gates = check_gates(result)
    paths = write_report(root / "reports" / "audit", result, gates)
    verdict = "PASS" if gates.passed else "FAIL: " + "; ".join(str(f) for f in gates.failures)
    print(f"fairness gates {verdict}")
    print(f"report: {paths['html']}")


def diagnose_stage(cfg: DemoConfig, server, root: Path) -> None:
    """Why act (c)'s canary was rolled back: `northstar diagnose` on the demo's own labels,
    log and world, the canary's trial window against the window before it."""
    # lazy: `northstar --help` imports this module
    from diagnose.rollback import diagnose_rollback

    scenario = root / "canary_scenario.json"
    act = json.loads(scenario.read_text()).get("acts", {}).get("c") if scenario.exists() else None
    if not act or act["retrain"]["status"] != "canary" or act.get("decision") != "rollback":
        print(f"act (c) did not end in a rollback ({scenario}); nothing to diagnose")
        return
    try:
        result, dcfg = diagnose_rollback(
            state_dir=root / "canary",
            version=int(act["retrain"]["version"]),
            labels=root / "labels",
            log=server.event_log,
            data=root / "data",
            out=root / "reports" / "diagnose",
        )
    except (ValueError, FileNotFoundError) as exc:  # e.g. no labels yet in the trial window
        print(f"no diagnosis: {exc}")
        return
    print(f"current {dcfg.current}, reference {dcfg.reference}")
    print(result.summary["headline"])
    top = result.summary["top_cause"]
    if top is None:  # the canary had half the traffic: the overall drop can be noise
        top = f"{result.findings[0].cause} (ranked first; the overall drop is not significant)"
    print(f"top cause: {top}")
    print(f"report: {Path(dcfg.out) / 'report.html'}")


# Stages that need the running server, in order: (cfg, server, root) -> None.
STAGES: list = [feedback_stage, audit_stage, canary_stage, diagnose_stage]
# Each stage's banner; a stage not listed is announced by its docstring's first line.
TITLES = {
    feedback_stage: "6. closed loop: simulated traffic -> event log -> join -> north-star metric",
    audit_stage: "7. fairness audit (Fairlearn): user groups and item groups",
    canary_stage: "8. canary loop: retrain -> offline gates -> Triton canary -> promote/rollback",
    diagnose_stage: "9. diagnose act (c)'s rollback: its trial window against the one before",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole loop end to end on a synthetic world",
        description="Settings are DemoConfig's fields: from --config FILE (a [demo] table or "
        "top level), then the flags below, then --set (the last one given wins).",
    )
    p.add_argument("--dir", help=f"output folder (dir; default {DemoConfig.dir})")
    p.add_argument("--preset", help=f"tiny | small | demo | large (default {DemoConfig.preset})")
    p.add_argument("--repo", help="Triton model repository (default DIR/model_repository)")
    p.add_argument("--seed", type=int, help=f"seed (default {DemoConfig.seed})")
    config_mod.add_config_args(p, "DemoConfig", "sim_users=500 sim_requests=1000 k=5")
    p.set_defaults(func=lambda a: run_demo(demo_config(a)))


def demo_config(args) -> DemoConfig:
    """DemoConfig from --config, then the flags, then --set."""
    flags = [
        f"{key}={getattr(args, key)}"
        for key in ("dir", "preset", "repo", "seed")
        if getattr(args, key) is not None
    ]
    return config_mod.load(DemoConfig, args.config, flags + list(args.set), section="demo")
