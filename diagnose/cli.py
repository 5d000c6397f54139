"""`northstar diagnose`: why the north star dropped, ranked causes, a plan, a report."""

from __future__ import annotations

import argparse

from common import config as config_mod
from diagnose.config import DiagnoseConfig

# Shorthand flag (argparse dest) -> DiagnoseConfig field.
_FLAGS = (
    "labels",
    "out",
    "current",
    "reference",
    "reference_weeks",
    "log",
    "data",
    "versions",
    "served_features",
    "training_features",
    "previous_recs",
    "previous_version",
    "drift_engine",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="diagnose a drop in the north star: ranked causes, evidence, a plan",
        description="Compare a current window with a reference window (or the weeks before "
        "it) and write report.html, report.json and report.md. Settings are DiagnoseConfig's "
        "fields (diagnose/config.py): --config FILE, then the flags, then --set.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("suite",),
        help="`suite`: run the planted-fault suite (every fault over --seeds seeds plus "
        "healthy runs) and write suite.json and suite.md to --out",
    )
    p.add_argument("--seeds", type=int, help="suite: seeds per fault (3)")
    p.add_argument("--healthy", type=int, help="suite: healthy runs (default: --seeds)")
    p.add_argument("--labels", help="the join's output folder (labels)")
    p.add_argument("--out", help="report folder (out)")
    p.add_argument("--current", help="YYYY-MM-DD:YYYY-MM-DD, UTC, both days included")
    p.add_argument("--reference", help="YYYY-MM-DD:YYYY-MM-DD; default: weeks before current")
    p.add_argument("--reference-weeks", type=int, help="weeks before --current (default 2)")
    p.add_argument("--log", help="event log: unlabelled impressions count as pending")
    p.add_argument("--data", help="dataset folder (users, items, interactions .parquet)")
    p.add_argument("--versions", help="model_version, trained_until table (.json/.parquet/.csv)")
    p.add_argument("--served-features", help="feature log: user_id, ts, features served")
    p.add_argument("--training-features", help="user_id[, ts], features as training saw them")
    p.add_argument("--previous-recs", help="user_id, position, item_id of the previous model")
    p.add_argument("--previous-version", type=int, help="the version to compare against")
    p.add_argument("--drift-engine", choices=("evidently", "scipy"))
    config_mod.add_config_args(p, "DiagnoseConfig", "min_segment_impressions=500 k=20")
    p.set_defaults(func=_diagnose)
    _register_monitor(sub)


def _register_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="export the north star, label lag and drift as Prometheus metrics; diagnose on alerts",
        description="Serve /metrics (the north star per version and user group over a "
        "sliding window, its trailing baseline, label lag, PSI per user feature, canary "
        "guardrail breaches), recomputed every --interval seconds, and an Alertmanager "
        "webhook (POST /alerts) that diagnoses the alert's window and serves the report "
        "under /reports/.",
    )
    p.add_argument("--labels", required=True, help="the join's output folder")
    p.add_argument("--log", default="", help="event log (pending labels, watermark lag)")
    p.add_argument("--data", default="", help="dataset folder (user groups)")
    p.add_argument("--canary-state", default="", help="the canary's state folder")
    p.add_argument("--port", type=int, default=9109, help="0 = any free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--window-hours", type=float, default=24.0)
    p.add_argument("--baseline-hours", type=float, default=168.0)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between recomputes")
    p.add_argument("--reports", default="monitor-reports", help="alert reports folder")
    p.add_argument("--public-url", default="", help="base URL the alert links use")
    p.add_argument("--once", action="store_true", help="print the metrics once and exit")
    p.set_defaults(func=_monitor)


def _monitor(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from diagnose.exporter import MonitorServer, serve
    from diagnose.monitor import MonitorConfig

    cfg = MonitorConfig(
        labels=args.labels,
        log=args.log,
        data=args.data,
        canary_state=args.canary_state,
        port=args.port,
        host=args.host,
        window_hours=args.window_hours,
        baseline_hours=args.baseline_hours,
        interval=args.interval,
        reports=args.reports,
        public_url=args.public_url,
    )
    if args.once:
        server = MonitorServer(cfg)
        server.refresh(raise_errors=True)
        print(server.metrics().decode(), end="")
        return 0
    return serve(cfg)


def _suite(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from diagnose.suite import markdown, run_suite

    out = args.out or "reports/diagnose-suite"
    body = run_suite(3 if args.seeds is None else args.seeds, out, healthy=args.healthy)
    print(markdown(body))
    print(f"wrote {out}/suite.json and {out}/suite.md")
    return 0


def diagnose_config(args):
    """DiagnoseConfig from the --config file, then the flags, then --set."""

    values = config_mod.read_file(args.config) if args.config else {}
    values = values.get("diagnose", values)
    values.update({f: getattr(args, f) for f in _FLAGS if getattr(args, f, None) is not None})
    given = set(values) | {s.split("=", 1)[0] for s in args.set or []}
    for field, what in _REQUIRED.items():
        if field not in given:
            raise ValueError(f"--{field}: required; expected {what}")
    return config_mod.load(DiagnoseConfig, None, args.set, base=values)


# The fields without a default: a missing one is named as its flag, with what it takes.
_REQUIRED = {
    "labels": "the join's output folder (`northstar feedback join --out`)",
    "current": "the window to diagnose, YYYY-MM-DD:YYYY-MM-DD (UTC)",
    "out": "the report folder",
}


def _diagnose(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from diagnose.run import diagnose

    if args.action == "suite":
        return _suite(args)
    for flag in ("seeds", "healthy"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag}: only with `northstar diagnose suite`")

    cfg = diagnose_config(args)
    result = diagnose(cfg)
    print(result.summary["headline"])
    if not result.summary["significant"]:
        print(f"report: {cfg.out}/report.html")
        return 0
    for i, f in enumerate(result.findings, 1):
        share = f.share_of_drop
        print(f"{i}. {f.cause:<28} explains {f.explained:+.4f} CTR ({share:.0%} of the drop)")
    print(f"report: {cfg.out}/report.html")
    return 0
