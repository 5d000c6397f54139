"""`northstar simulate`: the closed loop against a live server (or in-process doubles)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="closed loop: simulated users against the live server")
    p.add_argument("--world", required=True, help="folder with world.npz (northstar data synth)")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--url", default=None, help="Triton gRPC/HTTP address (default localhost)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--window", default="30m", help="must equal the join's window")
    p.add_argument("--request-id-share", type=float, default=0.8)
    p.add_argument("--resend-share", type=float, default=0.01)
    p.add_argument("--malformed-share", type=float, default=0.0)
    p.add_argument("--orphan-share", type=float, default=0.0)
    p.add_argument(
        "--local-log",
        default=None,
        metavar="PATH",
        help="no server: an in-process recommender and ingest on this log",
    )
    p.add_argument(
        "--reconcile",
        default=None,
        metavar="LABELS_DIR",
        help="afterwards, join --log into LABELS_DIR and check the counts",
    )
    p.add_argument("--log", default=None, help="the server's event log, for --reconcile")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.set_defaults(func=_simulate)


def _simulate(args) -> int:
    from feedback.join import parse_duration
    from feedback.sink import open_sink
    from simulator import SimulateConfig, reconcile, simulate
    from simulator.doubles import LocalRecommender, SinkSender

    cfg = SimulateConfig(
        world=args.world,
        users=args.users,
        requests=args.requests,
        url=args.url,
        protocol=args.protocol,
        seed=args.seed,
        k=args.k,
        concurrency=args.concurrency,
        window_s=parse_duration(args.window),
        request_id_share=args.request_id_share,
        resend_share=args.resend_share,
        malformed_share=args.malformed_share,
        orphan_share=args.orphan_share,
    )
    kwargs = {}
    log_path = args.log
    if args.local_log:
        sink = open_sink(args.local_log)
        local = LocalRecommender(args.world, sink, seed=args.seed)
        kwargs = {"client_factory": lambda: local, "sender": SinkSender(sink)}
        log_path = log_path or args.local_log
    rep = simulate(cfg, **kwargs)
    summary = rep.summary()
    print(json.dumps(summary, indent=1))
    result = {"simulation": summary}
    if args.reconcile:
        if not log_path:
            raise ValueError("--reconcile needs --log (the server's NORTHSTAR_EVENT_LOG)")
        rec = reconcile(rep, log_path=log_path, labels_dir=args.reconcile, window_s=cfg.window_s)
        print(json.dumps(rec, indent=1))
        result["reconcile"] = rec
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.reconcile and not result["reconcile"]["ok"]:
        return 1
    return 0 if rep.requests_failed == 0 else 1
