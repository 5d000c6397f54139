"""`northstar feedback join|metrics|positives|quarantine|bench` and `northstar simulate`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    fb = sub.add_parser("feedback", help="event log: join into labels, north-star metrics")
    fsub = fb.add_subparsers(dest="feedback_command", required=True)

    p = fsub.add_parser("join", help="attribute interactions to impressions (incremental)")
    p.add_argument("--log", required=True, help="event log (events.db or sqlite:///path)")
    p.add_argument("--out", required=True, help="labels folder (date=YYYY-MM-DD/part-*.parquet)")
    p.add_argument("--window", default="30m", help="attribution window, e.g. 30m, 2h (default 30m)")
    p.add_argument(
        "--as-of",
        default=None,
        help="watermark: 'log' (default: the log's max event ts), 'now', 'end' "
        "(close every window), unix seconds or an ISO time",
    )
    p.add_argument(
        "--lookback",
        default="7d",
        help="how far back written labels are searched to classify late clicks",
    )
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

    p = fsub.add_parser("bench", help="measure ingest rate and join time")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5_000)
    p.add_argument(
        "--random-ids",
        type=int,
        default=300_000,
        help="events for the random-id comparison (0 = skip)",
    )
    p.add_argument("--writers", type=int, default=4, help="concurrent writer processes")
    p.add_argument("--impressions", type=int, default=1_000_000)
    p.add_argument("--dir", default=None, help="keep the files here (default: temp, removed)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.set_defaults(func=_bench)


def _join(args) -> int:
    from feedback.join import JoinConfig, export_positives, parse_as_of, parse_duration, run_join

    cfg = JoinConfig(
        log=args.log,
        out=args.out,
        window_s=parse_duration(args.window),
        as_of=parse_as_of(args.as_of),
        late_lookback_s=parse_duration(args.lookback),
    )
    rep = run_join(cfg)
    wm = (
        "none"
        if rep.watermark is None
        else ("end" if math.isinf(rep.watermark) else f"{rep.watermark:.3f}")
    )
    if rep.noop:
        print(f"up to date: nothing new in {args.log} (watermark {wm}, {rep.pending} pending)")
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
        n = export_positives(args.out, args.positives)
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


def _bench(args) -> int:
    from feedback.bench import BenchConfig, main

    main(
        BenchConfig(
            events=args.events,
            batch=args.batch,
            random_ids=args.random_ids,
            writers=args.writers,
            impressions=args.impressions,
            dir=args.dir,
        ),
        out=args.out,
    )
    return 0
