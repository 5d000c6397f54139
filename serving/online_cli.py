"""`northstar online seed` and `northstar online rebuild`: fill the shared online store.

seed: every user of a run's dataset (categoricals, last H events, seen set), pipelined,
with the event log's current offset as the checkpoint (events after it are replayed by
rebuild). rebuild: after Redis lost writes (a `kill -9` without its AOF, a new server),
replay the event log's interactions since the store's checkpoint, in chunks; replaying
what the store already has changes nothing (apply is idempotent).
"""

from __future__ import annotations

import argparse
import sys
import time

from common.redact import redacted
from feedback.events import INTERACTION
from feedback.sink import open_source
from serving.seed import replay, seed_from_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("online", help="the shared online feature store (Redis)")
    osub = p.add_subparsers(dest="online_command", required=True)

    s = osub.add_parser("seed", help="seed the store from a run's training data")
    s.add_argument("--run", required=True, help="run directory written by `northstar train`")
    s.add_argument("--url", required=True, help="redis://host:port/db")
    s.add_argument("--event-log", help="event log whose current offset is the checkpoint")
    s.add_argument("--history-len", type=int, default=50, help="events kept per user")
    s.set_defaults(func=_seed)

    r = osub.add_parser("rebuild", help="replay the event log since the store's checkpoint")
    r.add_argument("--url", required=True, help="redis://host:port/db")
    r.add_argument("--event-log", required=True, help="the SQLite event log")
    r.add_argument(
        "--run", help="reseed from this run first when the store lost its seed (required then)"
    )
    r.set_defaults(func=_rebuild)


def _log_offset(event_log: str | None) -> int:
    if not event_log:
        return 0

    with open_source(event_log) as src:
        return int(src.snapshot()[INTERACTION])


def _seed(args) -> int:
    t0 = time.perf_counter()
    checkpoint = _log_offset(args.event_log)
    stats = seed_from_run(args.run, args.url, checkpoint=checkpoint, history_len=args.history_len)
    print(
        f"seeded {redacted(args.url)}: {stats.users} users, {stats.interactions} events, "
        f"checkpoint {checkpoint}, in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _rebuild(args) -> int:
    try:
        after, rows = replay(args.url, args.event_log, run=args.run)
    except ValueError as exc:
        print(f"northstar online rebuild: error: {exc}", file=sys.stderr)
        return 2
    print(f"replayed {rows} interactions after seq {after} into {redacted(args.url)}")
    return 0
