"""What one simulator run is asked to do, and what it saw."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

# Malformed events the simulator can inject, with the quarantine reason each must get.
MALFORMED = (
    ("type", "purchase", "type: not one of click|watch|like"),
    ("item_id", -5, "item_id: negative"),
    ("ts", float("nan"), "ts: missing"),
    ("event_id", "", "event_id: empty"),
)


@dataclass(frozen=True)
class SimulateConfig:
    """`northstar simulate --config FILE` (a [simulate] table or top level), `--set KEY=VALUE`;
    the flags are shorthands for some fields. These defaults are the only ones."""

    world: str  # folder with world.npz + world.json (northstar data synth --out)
    users: int = 500  # population size, drawn by activity rate
    requests: int = 2000  # slates asked for (one user each)
    url: str | None = None  # default: the protocol's localhost port
    protocol: Literal["grpc", "http"] = "grpc"
    seed: int = 0
    k: int = 10
    concurrency: int = 8  # client threads; one client per thread
    # Only used to keep the expected statuses exact (see the module docstring); the join
    # has its own window, which must be the same.
    window_s: float = 1800.0
    # Median 90 s, sigma 1.5: most clicks in the first minutes, a few percent after 30 min.
    delay_median_s: float = 90.0
    delay_sigma: float = 1.5
    max_delay_s: float = 6 * 3600.0  # well inside the log's one-day future bound
    request_id_share: float = 0.8  # clients that keep the request id; the rest by (user, item)
    like_share: float = 0.3  # P(like | watched more than 80%)
    watch_report_s: float = 30.0  # watch event time after its click (first progress report)
    resend_share: float = 0.01  # at-least-once delivery: events sent twice
    malformed_share: float = 0.0  # extra malformed events, per valid event
    orphan_share: float = 0.0  # extra clicks on items never shown to the user
    retries: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    # Retry each request for up to this long instead of `retries` times: a client that
    # must ride out a server restart (hardening test, soak) sets it to tens of seconds.
    retry_deadline_s: float | None = None
    send_batch: int = 512
    timeout_s: float = 30.0
    # A user clicks an item they already clicked earlier in the simulation at this fraction
    # of the usual rate (people rarely rewatch a film right away). It needs a ClickMemory
    # that lives across simulate() calls (loadtest.scenario.Traffic keeps one); 1.0 = no memory.
    rewatch_factor: float = 0.2

    def __post_init__(self) -> None:
        for name in ("users", "k", "concurrency", "send_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"SimulateConfig.{name}={getattr(self, name)}: expected >= 1")
        for name in ("requests", "retries", "backoff_s", "max_backoff_s", "max_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"SimulateConfig.{name}={getattr(self, name)}: expected >= 0")
        for name in ("request_id_share", "like_share", "resend_share", "rewatch_factor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SimulateConfig.{name}={getattr(self, name)}: expected 0..1")
        for name in ("malformed_share", "orphan_share"):
            if getattr(self, name) < 0:
                raise ValueError(f"SimulateConfig.{name}={getattr(self, name)}: expected >= 0")
        for name in ("window_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SimulateConfig.{name}={getattr(self, name)}: expected > 0")
        if self.retry_deadline_s is not None and not self.retry_deadline_s > 0:
            raise ValueError(
                f"SimulateConfig.retry_deadline_s={self.retry_deadline_s}: expected > 0 or none"
            )


@dataclass
class SimReport:
    requests: int = 0  # slates asked for
    requests_ok: int = 0
    requests_failed: int = 0  # after retries
    retries: int = 0
    failed_attempts: int = 0  # attempts that raised, retried or not
    # Span from the first failed attempt to the last one (0: none failed), on simulate()'s
    # clock (wall clock by default): how long the server was unreachable as the client saw it.
    error_window_s: float = 0.0
    items_returned: int = 0  # = impressions the server must have logged for these requests
    users_served: int = 0
    cold_start: int = 0
    clicks: int = 0
    events: dict[str, int] = field(default_factory=dict)  # unique valid events by type
    events_sent: int = 0  # every row sent: valid + re-sent + malformed + orphans
    resent: int = 0
    malformed_sent: int = 0
    orphans_sent: int = 0
    accepted: int = 0  # unique valid events acknowledged (incl. orphans)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows
    send_failed_batches: int = 0
    send_retries: int = 0
    expected: dict[str, int] = field(default_factory=dict)  # joined / late / unattributed
    expected_exact: bool = True  # False when some events have no request_id
    delay_after_window: int = 0  # clicks whose delay put them past the window
    rewatch_impressions: int = 0  # items shown again to a user who had clicked them
    seconds: float = 0.0
    request_ids: list[str] = field(default_factory=list, repr=False)
    event_ids: list[str] = field(default_factory=list, repr=False)  # accepted, unique
    expected_by_event: dict[str, str] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("request_ids", "event_ids", "expected_by_event"):
            d.pop(k)
        return d
