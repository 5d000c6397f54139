"""`northstar export`, `northstar serve`, `northstar recommend`."""

from __future__ import annotations

import argparse
import sys

from common import config as config_mod
from common.redact import redacted
from serving import repository as layout
from serving.client import RecommenderClient, recommend_all_users


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run to the Triton model repository (new version)")
    p.add_argument("--run", required=True, help="run directory written by `northstar train`")
    p.add_argument("--repo", help="Triton model repository (repo; default model_repository)")
    p.add_argument(
        "--target",
        choices=["cpu", "gpu"],
        default=None,
        help="cpu: Python backend + onnxruntime; gpu: Triton's onnxruntime backend",
    )
    p.add_argument("--k", type=int, default=None, help="largest k `recommend` serves (100)")
    p.add_argument(
        "--no-promote",
        action="store_true",
        help="write the version but leave routing.json as it is",
    )
    p.add_argument(
        "--url",
        default=None,
        help="gRPC address of a running server, or several comma-separated (replicas on "
        "one repository): load the version on every one first, then route to it",
    )
    config_mod.add_config_args(p, "ExportConfig", "overfetch=50 retrieval.instances=2")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "serve",
        help="run tritonserver on the model repository until Ctrl-C",
        description="Settings are ServerConfig's fields (serving/server.py): from --config "
        "FILE (a [server] table or top level), then the flags below, then --set (the last "
        "one given wins). Defaults are ServerConfig's. The server is reported ready only "
        "when it can answer: every model loaded and recommend able to serve production "
        "(routing.json, its meta.json and features readable); otherwise serve stops with "
        "the reason and the file.",
    )
    p.add_argument("--repo", help="model repository (repo; default model_repository)")
    p.add_argument("--host", help="listen address (host; 0.0.0.0: all)")
    p.add_argument("--http-port", type=int, help="http_port (0 = pick a free port)")
    p.add_argument("--grpc-port", type=int, help="grpc_port (0 = pick a free port)")
    p.add_argument("--metrics-port", type=int, help="metrics_port (0 = pick a free port)")
    p.add_argument("--log-file", help="server log (log_file; default: a temp file)")
    p.add_argument("--log-verbose", type=int, help="log_verbose")
    p.add_argument(
        "--event-log",
        help="event log for impressions and interactions (event_log; default: "
        "$NORTHSTAR_EVENT_LOG)",
    )
    p.add_argument(
        "--online-store",
        help="live user features and the routing record from this Redis (online_store; "
        "redis://host:port/db; default: $NORTHSTAR_ONLINE_STORE, else per-version snapshots "
        "and routing.json). Replicas on one repository share it: routing switches on all "
        "of them at once",
    )
    p.add_argument(
        "--front-proxy",
        choices=["auto", "on", "off"],
        help="nginx in front, bounding request bodies (front_proxy; auto: on unless the "
        "host is loopback)",
    )
    config_mod.add_config_args(p, "ServerConfig", "startup_timeout_s=300 exit_timeout_s=10")
    p.set_defaults(func=_serve)

    p = sub.add_parser("recommend", help="ask the running server for recommendations")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, action="append", help="raw user id (repeatable)")
    who.add_argument(
        "--all-users",
        action="store_true",
        help="every user of the production snapshot, via `retrieval`, to --out",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument(
        "--url",
        default=None,
        help="host:port (default localhost:8001 / :8000); several comma-separated: "
        "round-robin over the replicas with failover",
    )
    p.add_argument("--out", default=None, help="Parquet file for --all-users")
    p.add_argument("--batch-size", type=int, default=1024, help="users per --all-users request")
    p.add_argument("--repo", default="model_repository", help="where --all-users finds users")
    p.add_argument("--version", type=int, default=None, help="--all-users: retrieval version")
    p.add_argument("--keep-seen", action="store_true", help="--all-users: keep seen items")
    p.set_defaults(func=_recommend)


def _export(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from serving.publish import ExportConfig, export

    flags = [f"run={args.run}"]
    flags += [
        f"{key}={val}"
        for key, val in (
            ("repo", args.repo),
            ("target", args.target),
            ("k", args.k),
            ("url", args.url),
        )
        if val is not None
    ]
    if args.no_promote:
        flags.append("promote=false")
    # File first, then these flags, then --set: the most specific wins.
    cfg = config_mod.load(ExportConfig, args.config, flags + list(args.set))
    res = export(cfg)
    p = res.parity
    print(f"wrote {res.path} (version {res.version}, {cfg.target} target, {res.exporter} exporter)")
    print(
        f"  k={res.k} (graph top-{res.graph_k}); parity on {p.users} users "
        f"({p.cold_users} cold): max |Δscore| {p.max_score_diff:.2e}, "
        f"{p.tie_swaps} tie swaps"
    )
    r = res.routing
    canary = f", canary {r.canary} at {r.canary_percent}%" if r.canary else ""
    print(f"  routing: production {r.production}{canary}")
    return 0


_SERVE_FLAGS = (
    "repo",
    "host",
    "http_port",
    "grpc_port",
    "metrics_port",
    "log_file",
    "log_verbose",
    "event_log",
    "front_proxy",
    "online_store",
)  # each flag's argparse dest is the ServerConfig field it sets


def server_config(args):
    """ServerConfig from --config, then the flags, then --set."""
    # lazy: the CLI handlers' helper; `northstar --help` loads none of their dependencies
    from serving.server import ServerConfig

    flags = [f"{k}={getattr(args, k)}" for k in _SERVE_FLAGS if getattr(args, k) is not None]
    return config_mod.load(ServerConfig, args.config, flags + list(args.set), section="server")


def _serve(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from serving.server import ServerError, TritonServer, serve_forever

    cfg = server_config(args)
    try:
        server = TritonServer(cfg).start()
    except ServerError as exc:  # the message carries the reason and the server log's tail
        print(f"northstar serve: error: {exc}", file=sys.stderr)
        return 1
    print(f"tritonserver ready (pid {server.process.pid}); Ctrl-C to stop")
    print(f"  HTTP    http://{server.http_url}")
    print(f"  gRPC    {server.grpc_url}")
    print(f"  metrics {server.metrics_url}")
    print(f"  log     {server.log_path}")
    if server.proxy is not None:
        print(
            f"  proxy   nginx on the HTTP and gRPC ports: bodies <= "
            f"{cfg.proxy_max_body_bytes} bytes, uncompressed (serving/proxy.py)"
        )
    if server.routing is not None:
        r = server.routing
        canary = f", canary {r.canary} at {r.canary_percent}%" if len(r.versions) > 1 else ""
        where = (
            f"epoch {server.routing_epoch} in {redacted(server.online_store)}"
            if server.online_store
            else layout.routing_path(cfg.repo)
        )
        print(f"  routing production {r.production}{canary} (from {where})")
    sys.stdout.flush()
    return serve_forever(server)


def _recommend(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from tritonclient.utils import InferenceServerException

    try:
        return _recommend_inner(args)
    except InferenceServerException as exc:  # the server's message names the bad input
        raise ValueError(f"{exc.message()} (server {args.url or 'default'})") from exc


def _recommend_inner(args) -> int:
    with RecommenderClient(args.url, args.protocol) as client:
        if args.all_users:
            if not args.out:
                raise ValueError("--all-users needs --out FILE.parquet")
            df = recommend_all_users(
                client,
                args.repo,
                k=args.k,
                batch_size=args.batch_size,
                version=args.version,
                keep_seen=args.keep_seen,
            )
            df.to_parquet(args.out, index=False)
            print(f"wrote {len(df)} rows for {df['user_id'].nunique()} users to {args.out}")
            return 0
        recs = client.recommend(args.user, k=args.k)
    print(f"{'user':>10} {'rank':>4} {'item':>10} {'score':>8}  version  cold  request")
    for r in recs:
        if len(r.item_ids) == 0:
            print(
                f"{r.user_id:>10}    -          -        -  {r.model_version:>7}  "
                f"{'yes' if r.cold_start else 'no':>4}  {r.request_id}"
            )
        for i, (item, score) in enumerate(zip(r.item_ids, r.scores, strict=True)):
            tail = (
                f"  {r.model_version:>7}  {'yes' if r.cold_start else 'no':>4}  {r.request_id}"
                if i == 0
                else ""
            )
            print(f"{r.user_id if i == 0 else '':>10} {i + 1:>4} {item:>10} {score:>8.4f}{tail}")
    return 0
