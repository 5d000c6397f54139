"""`northstar simulate`: the closed loop against a live server (or in-process doubles)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import config as config_mod
from feedback.join import parse_duration
from feedback.sink import open_sink
from simulator import reconcile, simulate
from simulator.config import SimulateConfig
from simulator.doubles import LocalRecommender, SinkSender

# Shorthand flag (argparse dest) -> SimulateConfig field. Every flag defaults to None:
# a flag left out leaves the field to --config or to SimulateConfig's own default.
_FLAGS = (
    ("world", "world"),
    ("users", "users"),
    ("requests", "requests"),
    ("url", "url"),
    ("protocol", "protocol"),
    ("seed", "seed"),
    ("k", "k"),
    ("concurrency", "concurrency"),
    ("request_id_share", "request_id_share"),
    ("resend_share", "resend_share"),
    ("malformed_share", "malformed_share"),
    ("orphan_share", "orphan_share"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="closed loop: simulated users against the live server",
        description="Settings are SimulateConfig's fields (simulator/config.py): from "
        "--config FILE (a [simulate] table or top level), then the flags below, then --set "
        "(the last one given wins). Defaults are SimulateConfig's.",
    )
    d = SimulateConfig  # the defaults shown are the dataclass's, the only ones
    p.add_argument("--world", help="folder with world.npz (northstar data synth); field world")
    p.add_argument("--users", type=int, help=f"population size (users; default {d.users})")
    p.add_argument(
        "--requests", type=int, help=f"slates asked for (requests; default {d.requests})"
    )
    p.add_argument("--url", help="Triton gRPC/HTTP address (url; default: localhost)")
    p.add_argument("--protocol", choices=("grpc", "http"), help=f"default {d.protocol}")
    p.add_argument("--seed", type=int, help=f"seed (default {d.seed})")
    p.add_argument("--k", type=int, help=f"items per slate (k; default {d.k})")
    p.add_argument(
        "--concurrency", type=int, help=f"client threads (concurrency; default {d.concurrency})"
    )
    p.add_argument(
        "--window",
        help=f"window_s as a duration, e.g. 30m (default {d.window_s:g} s); must equal the "
        "join's window",
    )
    for name in ("request_id_share", "resend_share", "malformed_share", "orphan_share"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=float, help=f"{name} (default {getattr(d, name)})")
    config_mod.add_config_args(
        p, "SimulateConfig", "retries=5 retry_deadline_s=60 delay_median_s=30"
    )
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
    # The studies (studies/cli.py) add `simulate freshness|depth|replay|tiers` to `p`.


def simulate_config(args):
    """SimulateConfig from --config, then the shorthand flags, then --set."""

    flags = [
        f"{key}={getattr(args, dest)}" for dest, key in _FLAGS if getattr(args, dest) is not None
    ]
    if args.window is not None:
        flags.append(f"window_s={parse_duration(args.window)}")
    try:
        return config_mod.load(
            SimulateConfig, args.config, flags + list(args.set), section="simulate"
        )
    except TypeError as exc:  # a field without a default (world) was given nowhere
        raise config_mod.ConfigError(
            f"SimulateConfig: {exc}; give --world DIR or world= in --config / --set"
        ) from exc


def _simulate(args) -> int:
    # lazy: `northstar --help` loads no handler's dependencies

    cfg = simulate_config(args)
    kwargs = {}
    log_path = args.log
    if args.local_log:
        sink = open_sink(args.local_log)
        local = LocalRecommender(cfg.world, sink, seed=cfg.seed)
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
