"""`northstar feedback join|metrics|positives|quarantine|bench|consume|lag`."""

from __future__ import annotations

import argparse
import json
import math
import signal
import threading
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
    p.add_argument(
        "--log",
        help="event log: events.db, sqlite:///path, or a Parquet lake (a folder or a URL "
        "such as s3://bucket/events); field log",
    )
    p.add_argument("--out", help="labels folder (date=YYYY-MM-DD/part-*.parquet); field out")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (the default); ray: one Ray task per user bucket of a "
        "lake (feedback/engine_ray.py), the same labels",
    )
    p.add_argument(
        "--address",
        default=None,
        help="--engine ray: a running cluster (host:port from `ray start --head`); "
        "default: start a local one",
    )
    p.add_argument(
        "--num-cpus", type=int, default=None, help="--engine ray, local cluster: its CPUs"
    )
    p.add_argument(
        "--node-ip",
        default=None,
        help="--engine ray --address: this driver's IP on the cluster's network, where the "
        "host has several and Ray would pick the wrong one",
    )
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
    p.add_argument(
        "--stream",
        action="store_true",
        help="measure the Redis Stream path instead (StreamBenchConfig: events, batch, "
        "partitions, rate, seconds, url; default starts a redis-server in a temp dir)",
    )
    p.add_argument("--url", help="stream bench: an existing redis:// URL (url)")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: the distributed join on a Parquet lake beside the local join, for 1 and 2 "
        "workers (RayBenchConfig in feedback/bench_ray.py: impressions, buckets, workers)",
    )
    p.set_defaults(func=_bench)

    p = fsub.add_parser(
        "consume",
        help="move events from the Redis Stream into the SQLite log (until SIGTERM)",
        description="A log-writer consumer (feedback/consume.py). Stream layout from the URL "
        "query (prefix=, partitions=); consumer settings are ConsumerConfig's fields: "
        "--config FILE, then the flags, then --set.",
    )
    p.add_argument("--url", required=True, help="redis://host:port/db[?prefix=..&partitions=..]")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--log", help="log writer: the SQLite log (events.db) or a Parquet lake (folder or URL)"
    )
    what.add_argument(
        "--online-store",
        help="features consumer: apply interactions to this online store (redis://...); "
        "use --group features",
    )
    p.add_argument("--group", help="consumer group (group; default log)")
    p.add_argument("--consumer", help="consumer name, stable across restarts (default host name)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    config_mod.add_config_args(p, "ConsumerConfig", "count=16 min_idle_ms=60000")
    p.set_defaults(func=_consume)

    p = fsub.add_parser("lag", help="per partition and group: lag, pending, events behind")
    p.add_argument("--url", required=True, help="redis://host:port/db[?prefix=..&partitions=..]")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--metrics", action="store_true", help="print Prometheus text format")
    p.set_defaults(func=_lag)


def join_config(args):
    """JoinConfig from --config, then the flags (durations parsed), then --set."""
    # lazy: CLI handler; `northstar --help` imports this module
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
    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.join import export_positives, run_join

    cfg = join_config(args)
    if args.engine == "ray":
        from feedback.engine_ray import run_join_ray  # lazy: ray is heavy to import

        rep = run_join_ray(cfg, address=args.address, num_cpus=args.num_cpus, node_ip=args.node_ip)
    else:
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
    # lazy: CLI handler; `northstar --help` imports this module
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
    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.join import export_positives

    n = export_positives(args.labels, args.out)
    print(f"wrote {n:,} positives to {args.out}")
    return 0


def _quarantine(args) -> int:
    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.lake import is_lake, open_event_source

    if not is_lake(args.log) and not Path(args.log).exists():
        raise FileNotFoundError(f"{args.log}: no event log here")
    counts = open_event_source(args.log).quarantine_counts()
    if not counts:
        print("quarantine is empty")
    for kind, reasons in counts.items():
        for reason, n in reasons.items():
            print(f"{kind:<12} {n:>8,}  {reason}")
    return 0


def bench_config(args):
    """IngestBenchConfig (StreamBenchConfig with --stream) from --config, flags, --set."""
    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.bench import IngestBenchConfig, StreamBenchConfig

    if getattr(args, "engine", "local") == "ray":
        from feedback.bench_ray import RayBenchConfig  # lazy: imports ray

        flags = [
            f"{key}={getattr(args, key)}"
            for key in ("impressions", "dir")
            if getattr(args, key, None) is not None
        ]
        return config_mod.load(
            RayBenchConfig, args.config, flags + list(args.set), section="ray_bench"
        )
    if getattr(args, "stream", False):
        flags = [
            f"{key}={getattr(args, key)}"
            for key in ("events", "batch", "url", "dir")
            if getattr(args, key, None) is not None
        ]
        return config_mod.load(
            StreamBenchConfig, args.config, flags + list(args.set), section="stream_bench"
        )
    flags = [
        f"{key}={getattr(args, key)}"
        for key in ("events", "batch", "random_ids", "writers", "impressions", "dir")
        if getattr(args, key) is not None
    ]
    return config_mod.load(IngestBenchConfig, args.config, flags + list(args.set), section="bench")


def _bench(args) -> int:
    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.bench import main, main_stream

    cfg = bench_config(args)
    if args.engine == "ray":
        from feedback.bench_ray import main_ray  # lazy: imports ray

        main_ray(cfg, out=args.out)
        return 0
    (main_stream if args.stream else main)(cfg, out=args.out)
    return 0


def consumer_config(args):
    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.consume import ConsumerConfig

    flags = [
        f"{key}={getattr(args, key)}"
        for key in ("group", "consumer")
        if getattr(args, key) is not None
    ]
    return config_mod.load(ConsumerConfig, args.config, flags + list(args.set), section="consume")


def _consume(args) -> int:

    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.consume import run_log_writer
    from feedback.stream import StreamConfig

    cfg = consumer_config(args)
    stream = StreamConfig.from_url(args.url)
    stop = threading.Event()

    def _stop(signum, _frame) -> None:
        # Finish the batch in hand (commit + XACK), then return: a graceful drain.
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stats = run_log_writer(
        stream,
        cfg,
        args.log,
        stop=stop,
        metrics_port=args.metrics_port,
        online_store=args.online_store,
    )
    print(
        f"stopped: {stats.events:,} events in {stats.entries:,} entries "
        f"({stats.quarantine_entries:,} quarantine entries), {stats.claimed:,} claimed, "
        f"{stats.trimmed:,} trimmed, {stats.errors:,} errors"
    )
    return 0


def _lag(args) -> int:

    # lazy: CLI handler; `northstar --help` imports this module
    from feedback.lag import format_lag, lag_dicts, lag_metrics, stream_lag
    from feedback.stream import StreamConfig, connect

    stream = StreamConfig.from_url(args.url)
    client = connect(stream)
    try:
        rows = stream_lag(client, stream)
    finally:
        client.close()
    if args.json:
        print(json.dumps(lag_dicts(rows), indent=1))
    elif args.metrics:
        print(lag_metrics(rows), end="")
    else:
        print(format_lag(rows))
    return 0
