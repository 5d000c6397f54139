"""Pass/fail thresholds for a Locust run (kept apart from the locustfile, which patches gevent).

Like locust's examples/stop_on_threshold.py, but judged once at the end of the run:
the locustfile's `quitting` listener sets `environment.process_exit_code = 1` when this
returns any problem.
"""

from __future__ import annotations

RECOMMEND = "recommend"


def threshold_failures(stats, *, max_p99_ms: float, max_fail_ratio: float) -> list[str]:
    """Why the run failed its thresholds (empty: it passed). `stats` is environment.stats.

    - no request at all is a failure (a run that never reached the server);
    - the failure ratio over all requests must be <= max_fail_ratio;
    - the p99 of `recommend` (the user-facing call) must be <= max_p99_ms, per protocol.
    """
    problems = []
    total = stats.total
    if total.num_requests == 0:
        problems.append("no requests were made")
    elif total.fail_ratio > max_fail_ratio:
        problems.append(f"failure ratio {total.fail_ratio:.4f} > {max_fail_ratio}")
    for entry in stats.entries.values():
        if entry.name == RECOMMEND and entry.num_requests:
            p99 = entry.get_response_time_percentile(0.99)
            if p99 > max_p99_ms:
                problems.append(
                    f"{entry.method} {RECOMMEND} p99 {p99:.0f} ms > {max_p99_ms:.0f} ms"
                )
    return problems
