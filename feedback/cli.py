"""`northstar feedback join|metrics|positives|quarantine|bench`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from common import config as config_mod


def register(sub: argparse._SubParsersAction) -> None:
    fb = sub.add_parser("feedback", help="event log: join into labels, north-star metrics")
    fsub = fb.add_subparsers(dest="feedback_command", required=True)

    p = fsub.add_parser(
        "join",
        help="attribute interactions to impressions (incremental)",
        description="Settings are JoinConfig's fields (feedback/join.py): from --config FILE "
        "(a [join] table or top level; durations in seconds there), then the flags below, "
        "then --set (the last one given wins). Defaults are JoinConfig's.",
    )
    p.add_argument("--log", help="event log (events.db or sqlite:///path); field log")
    p.add_argument("--out", help="labels folder (date=YYYY-MM-DD/part-*.parquet); field out")
    p.add_argument("--window", help="window_s as a duration, e.g. 30m, 2h")
    p.add_argument(
        "--as-of",
        help="as_of, the watermark: 'log' (the log's max event ts, the default), 'now', "
        "'end' (close every window), unix seconds or an ISO time",
    )
    p.add_argument(
        "--lookback",
        help="late_lookback_s as a duration: how far back written labels are searched to "
        "classify late clicks, e.g. 7d",
    )
    config_mod.add_config_args(p, "JoinConfig", "window_s=3600 as_of=inf")
    p.add_argument(
        "--positives",
        default=None,
        metavar="PATH",
        help="also export all positives in the interactions schema to PATH "
        "(for `northstar train --set extra_interactions=PATH`)",
    )
    p.set_defaults(func=_join)

    p = fsub.add_parser("metrics", help="north-star metric per model version, day, user group")
    p.add_argument("--labels", required=True, help="labels folder written by `feedback join`")
    p.add_argument("--users", default=None, help="users.parquet (gender, age_bucket, activity)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=_metrics)

    p = fsub.add_parser("positives", help="export joined positives in the interactions schema")
    p.add_argument("--labels", required=True)
    p.add_argument("--out", required=True, help="a .parquet file")
    p.set_defaults(func=_positives)

    p = fsub.add_parser("quarantine", help="count quarantined events per reason")
    p.add_argument("--log", required=True)
    p.set_defaults(func=_quarantine)

    p = fsub.add_parser(
        "bench",
        help="measure ingest rate and join time",
        description="Settings are IngestBenchConfig's fields (feedback/bench.py): --config "
        "FILE, then the flags below, then --set. Defaults are IngestBenchConfig's.",
    )
    p.add_argument("--events", type=int, help="interactions appended (events)")
    p.add_argument("--batch", type=int, help="rows per append (batch)")
    p.add_argument(
        "--random-ids",
        type=int,
        help="events for the random-id comparison (random_ids; 0 = skip)",
    )
    p.add_argument("--writers", type=int, help="concurrent writer processes (writers; 0 = skip)")
    p.add_argument("--impressions", type=int, help="impressions in the join figure")
    p.add_argument("--dir", help="keep the files here (dir; default: temp, removed)")
    config_mod.add_config_args(p, "IngestBenchConfig", "small_batch=1000 click_rate=0.1")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.set_defaults(func=_bench)


def join_config(args):
    """JoinConfig from --config, then the flags (durations parsed), then --set."""
    from feedback.join import JoinConfig, parse_as_of, parse_duration

    flags = [f"{key}={v}" for key, v in (("log", args.log), ("out", args.out)) if v is not None]
    if args.window is not None:
        flags.append(f"window_s={parse_duration(args.window)}")
    if args.lookback is not None:
        flags.append(f"late_lookback_s={parse_duration(args.lookback)}")
    if args.as_of is not None:
        as_of = parse_as_of(args.as_of)  # 'log' is None: the event-time watermark
        flags.append(f"as_of={'none' if as_of is None else as_of}")
    try:
        return config_mod.load(JoinConfig, args.config, flags + list(args.set), section="join")
    except TypeError as exc:  # log or out given nowhere
        raise config_mod.ConfigError(
            f"JoinConfig: {exc}; give --log and --out, or log= and out= in --config / --set"
        ) from exc


def _join(args) -> int:
    from feedback.join import export_positives, run_join

    cfg = join_config(args)
    rep = run_join(cfg)
    wm = (
        "none"
        if rep.watermark is None
        else ("end" if math.isinf(rep.watermark) else f"{rep.watermark:.3f}")
    )
    if rep.noop:
        print(f"up to date: nothing new in {cfg.log} (watermark {wm}, {rep.pending} pending)")
    else:
        print(
            f"run {rep.run}: read {rep.new_impressions:,} impressions and "
            f"{rep.new_interactions:,} interactions; wrote {rep.labels_written:,} labels "
            f"({rep.positives_written:,} positive); {rep.pending:,} pending; watermark {wm}; "
            f"{rep.seconds:.1f} s"
        )
        if rep.statuses:
            print("  interactions: " + ", ".join(f"{k} {v:,}" for k, v in rep.statuses.items()))
            print("  reasons:      " + ", ".join(f"{k} {v:,}" for k, v in rep.reasons.items()))
    if args.positives:
        n = export_positives(cfg.out, args.positives)
        print(f"wrote {n:,} positives to {args.positives}")
    return 0


def _metrics(args) -> int:
    import pandas as pd

    from feedback.join import read_labels
    from feedback.metrics import compute_metrics, format_metrics, write_metrics

    labels = read_labels(args.labels)
    if not len(labels):
        raise ValueError(f"{args.labels}: no labels yet; run `northstar feedback join` first")
    users = pd.read_parquet(args.users) if args.users else None
    report = compute_metrics(labels, users=users, confidence=args.confidence)
    print(format_metrics(report))
    if args.out:
        print(f"wrote {write_metrics(report, args.out)}")
    return 0


def _positives(args) -> int:
    from feedback.join import export_positives

    n = export_positives(args.labels, args.out)
    print(f"wrote {n:,} positives to {args.out}")
    return 0


def _quarantine(args) -> int:
    from feedback.sink import open_source

    if not Path(args.log).exists():
        raise FileNotFoundError(f"{args.log}: no event log here")
    counts = open_source(args.log).quarantine_counts()
    if not counts:
        print("quarantine is empty")
    for kind, reasons in counts.items():
        for reason, n in reasons.items():
            print(f"{kind:<12} {n:>8,}  {reason}")
    return 0


def bench_config(args):
    """IngestBenchConfig from --config, then the flags, then --set."""
    from feedback.bench import IngestBenchConfig

    flags = [
        f"{key}={getattr(args, key)}"
        for key in ("events", "batch", "random_ids", "writers", "impressions", "dir")
        if getattr(args, key) is not None
    ]
    return config_mod.load(IngestBenchConfig, args.config, flags + list(args.set), section="bench")


def _bench(args) -> int:
    from feedback.bench import main

    main(bench_config(args), out=args.out)
    return 0
