"""`northstar bench` (loadtest/bench.py) and `northstar soak` (loadtest/soak.py)."""

from __future__ import annotations

import argparse

from common import config as config_mod


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="served path vs in-process ONNX, faiss and a naive FastAPI peer, in one run",
        description="Rows (a)-(e) for each catalogue size; prints a table with ratios and "
        "writes bench.json, bench.png and bench.html to --out. Without --run, each size is "
        "an untrained TwoTower exported through the real export path (throughput only).",
    )
    p.add_argument("--items", type=int, nargs="+", help="catalogue sizes (default 100000)")
    p.add_argument("--out", default=None, help="report folder (default reports/bench)")
    p.add_argument("--run", default=None, help="a trained run instead of untrained catalogues")
    p.add_argument("--repo", default=None, help="the repository --run was exported to")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per row/level")
    p.add_argument("--concurrency", default=None, help="(c) sweep, e.g. 1,2,4,8,16,32,64")
    p.add_argument("--label", default=None, help="a name for this configuration")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny shapes, short windows")
    p.add_argument(
        "--retrieval", default=None, help="rows (f) per retrieval mode, e.g. exact,int8,hnsw"
    )
    config_mod.add_config_args(
        p, "BenchConfig", "recommend.instances=1 retrieval.max_queue_delay_us=200"
    )
    p.add_argument("--fail-on-targets", action="store_true", help="exit 1 if a target fails")
    p.set_defaults(func=_bench)
    register_soak(sub)

    p = sub.add_parser(
        "bench-online",
        help="live state side by side: feature lookup, event stream, recommend snapshot vs Redis",
        description="Starts its own redis-server and tritonservers; prints the tables and "
        "writes bench-online.json/.md/.png/.html to --out. Settings: OnlineBenchConfig's fields.",
    )
    p.add_argument("--out", default=None, help="report folder (default reports/bench-online)")
    config_mod.add_config_args(p, "OnlineBenchConfig", "lookup_users=20000 duration_s=5")
    p.set_defaults(func=_bench_online)


def _bench_online(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from loadtest.online_bench import (
        OnlineBenchConfig,
        format_online_bench,
        run_online_bench,
        write_reports,
    )

    flags = [f"out={args.out}"] if args.out else []
    cfg = config_mod.load(OnlineBenchConfig, args.config, flags + list(args.set))
    res = run_online_bench(cfg)
    print(format_online_bench(res))
    print(f"\nwrote {write_reports(res, cfg.out)}/bench-online.json, .md, .png, .html")
    return 0


def _bench(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from loadtest.bench import run_bench
    from loadtest.report import format_table

    cfg = bench_config(args)
    result = run_bench(cfg)
    print(format_table(result))
    print(f"\nwrote {cfg.out}/bench.json, bench.png, bench.html")
    failed = [c for s in result["sizes"] for c in s["checks"] if c["ok"] is False]
    return 1 if failed and args.fail_on_targets else 0


def bench_config(args):
    """BenchConfig from --tiny (the smoke base), then --config, then the flags and --set."""
    # lazy: the CLI handlers' helper; `northstar --help` loads none of their dependencies
    from loadtest.bench import BenchConfig, tiny_config

    flags = []
    if args.items:
        flags.append("items=" + ",".join(str(n) for n in args.items))
    for key, val in (
        ("out", args.out),
        ("run", args.run),
        ("repo", args.repo),
        ("duration_s", args.duration),
        ("concurrency", args.concurrency),
        ("label", args.label),
        ("retrieval_modes", getattr(args, "retrieval", None)),
    ):
        if val is not None:
            flags.append(f"{key}={val}")
    # --tiny starts from the smoke configuration; a file and the flags then override it.
    values = config_mod.to_dict(tiny_config("reports/bench")) if args.tiny else {}
    return config_mod.load(BenchConfig, args.config, flags + list(args.set), base=values)


def register_soak(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="simulated traffic + Locust + a canary cycle against a real server; exits 1 on loss",
        description="Runs for --duration seconds; writes soak.json, soak.md and soak.html "
        "(with plots) to --out. Exit 1 when an acknowledged event is lost, the error rate "
        "or the RSS growth is above its threshold, or the canary cycle did not promote.",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds (default 600)")
    p.add_argument("--out", default=None, help="report folder (default reports/soak)")
    config_mod.add_config_args(p, "SoakConfig", "canary_s=30 locust_users=8")
    p.set_defaults(func=_soak)


def _soak(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from loadtest.soak import SoakConfig, run_soak, write_reports

    flags = [f"{k}={v}" for k, v in (("duration_s", args.duration), ("out", args.out)) if v]
    cfg = config_mod.load(SoakConfig, args.config, [*flags, *args.set])
    rep = run_soak(cfg)
    paths = write_reports(rep, cfg.out)
    for c in rep.checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['text']}")
    print(f"soak {'passed' if rep.ok else 'FAILED'}; report {paths['html']}")
    return 0 if rep.ok else 1
