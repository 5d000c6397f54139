"""Consumer lag of the feedback stream: a function, a table, Prometheus text, an endpoint.

Per (partition, group), from Redis itself (nothing the consumer remembers):
- `lag`: entries not yet delivered to the group (XINFO GROUPS `lag`; counted server-side
  when Redis cannot tell, e.g. after an XDEL);
- `pending`: entries delivered but not acknowledged (a consumer is on them, or died);
- `events_behind`: events appended minus events the group acknowledged (two counters the
  producer and the consumer update in the same MULTI as their XADD / XACK), so it is in
  events, not entries;
- `oldest_unacked_age_s`: now minus the time in the id of the oldest entry the group has
  not acknowledged; 0 when caught up. This is the freshness an alert should watch.

No prometheus_client in this environment: `lag_metrics` writes the text exposition format
(version 0.0.4) by hand, and `serve_metrics` serves it from a daemon thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from feedback.stream import StreamConfig, parse_id

# Server-side, so the entries' data never crosses the wire.
_COUNT_AFTER = "return #redis.call('XRANGE', KEYS[1], ARGV[1], '+')"
_FIRST_AFTER = """
local r = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', 1)
if #r == 0 then return false end
return r[1][1]
"""


@dataclass(frozen=True)
class GroupLag:
    partition: int
    stream: str
    group: str
    length: int  # entries in the stream now (after trimming)
    lag: int  # entries not yet delivered to the group
    pending: int  # entries delivered, not yet acknowledged
    events_behind: int  # events appended minus events the group acknowledged
    oldest_unacked_age_s: float  # 0.0 when the group has acknowledged everything


def _int(v) -> int:
    return int(v) if v is not None else 0


def stream_lag(client, cfg: StreamConfig, *, now: float | None = None) -> list[GroupLag]:
    """One GroupLag per (partition, group) that exists, partition order."""
    # lazy: after ensure_ssl() (common/stub_python.py); the Triton stub needs that order
    import redis

    now = time.time() if now is None else now
    out: list[GroupLag] = []
    for p in range(cfg.partitions):
        key = cfg.stream_key(p)
        try:
            groups = client.xinfo_groups(key)
        except redis.ResponseError:  # no such stream yet
            continue
        length = client.xlen(key)
        produced = _int(client.get(cfg.produced_key(p)))
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            lag = g.get("lag")
            if lag is None:
                lag = client.eval(_COUNT_AFTER, 1, key, f"({last}")
            pending = int(g["pending"])
            if pending:
                oldest = client.xpending(key, name)["min"]
            elif lag:
                oldest = client.eval(_FIRST_AFTER, 1, key, f"({last}")
            else:
                oldest = None
            age = 0.0 if oldest is None else max(0.0, now - parse_id(oldest)[0] / 1000)
            out.append(
                GroupLag(
                    partition=p,
                    stream=key,
                    group=name,
                    length=int(length),
                    lag=int(lag),
                    pending=pending,
                    events_behind=produced - _int(client.get(cfg.acked_key(name, p))),
                    oldest_unacked_age_s=age,
                )
            )
    return out


def format_lag(rows: Sequence[GroupLag]) -> str:
    head = (
        f"{'partition':>9}  {'group':<12} {'length':>8} {'lag':>8} {'pending':>8} "
        f"{'events behind':>14} {'oldest unacked':>15}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.partition:>9}  {r.group:<12} {r.length:>8,} {r.lag:>8,} {r.pending:>8,} "
            f"{r.events_behind:>14,} {r.oldest_unacked_age_s:>13.1f} s"
        )
    if not rows:
        lines.append("(no stream or no consumer group yet)")
    return "\n".join(lines)


def lag_dicts(rows: Sequence[GroupLag]) -> list[dict]:
    return [asdict(r) for r in rows]


_METRICS = (
    ("length", "northstar_stream_length_entries", "gauge", "Entries in the stream partition."),
    ("lag", "northstar_stream_lag_entries", "gauge", "Entries not yet delivered to the group."),
    ("pending", "northstar_stream_pending_entries", "gauge", "Entries delivered, not acked."),
    (
        "events_behind",
        "northstar_stream_events_behind",
        "gauge",
        "Events appended minus events the group acknowledged.",
    ),
    (
        "oldest_unacked_age_s",
        "northstar_stream_oldest_unacked_age_seconds",
        "gauge",
        "Age of the oldest entry the group has not acknowledged (0 when caught up).",
    ),
)


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def lag_metrics(
    rows: Sequence[GroupLag], counters: dict[str, tuple[str, float]] | None = None
) -> str:
    """Prometheus text format. `counters`: name -> (help, value), e.g. a consumer's
    totals, written as `counter`s without labels."""
    lines: list[str] = []
    for attr, name, kind, help_ in _METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for r in rows:
            labels = (
                f'partition="{r.partition}",stream="{_label(r.stream)}",group="{_label(r.group)}"'
            )
            lines.append(f"{name}{{{labels}}} {float(getattr(r, attr))!r}")
    for name, (help_, value) in (counters or {}).items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {float(value)!r}"]
    return "\n".join(lines) + "\n"


def serve_metrics(
    port: int, render: Callable[[], str], host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve `render()` at GET /metrics from a daemon thread; `.shutdown()` stops it.
    Port 0 picks a free one (`server.server_address[1]`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            try:
                body = render().encode()
                code = 200
            except Exception as exc:  # Redis down: say so, keep serving
                body, code = f"# error: {exc}\n".encode(), 503
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # no per-scrape access log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


__all__ = ["GroupLag", "format_lag", "lag_dicts", "lag_metrics", "serve_metrics", "stream_lag"]
