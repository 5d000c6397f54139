"""One retry policy for every client call that may meet a restarting server (tenacity).

Exponential backoff with full jitter (AWS's "exponential backoff and jitter": clients
that failed together must not retry together and knock the server over again when it
comes back), capped per wait. Either a number of retries, or a deadline: a client
that must ride out a server restart (kill -9, then `northstar serve`: tens of
seconds) retries for as long as the deadline allows.

Retrying a recommend request is safe (it is a read; the repeat gets a new request id
and its own impressions only if it succeeds) and so is resending feedback (the log
stores an event_id once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tenacity


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # retries after the first attempt; ignored when deadline_s is set
    backoff_s: float = 0.05  # scale of the first wait; the cap doubles each retry
    max_backoff_s: float = 2.0  # no single wait longer than this
    deadline_s: float | None = None  # retry until this many seconds after the first try

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries={self.retries}; expected >= 0")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError(f"deadline_s={self.deadline_s}; expected > 0 or None")


def retrying(
    policy: RetryPolicy,
    *,
    retry_if: Callable[[BaseException], bool] | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> tenacity.Retrying:
    """`for attempt in retrying(policy): with attempt: call()`; re-raises the last error.

    `retry_if(exc)` False means the error is final (a malformed request will fail again);
    `on_retry(exc, attempt_number)` runs before each wait (counting, logging);
    `on_failure(exc)` runs after every failed retryable attempt, the last one included.
    """
    stop = (
        tenacity.stop_after_delay(policy.deadline_s)
        if policy.deadline_s is not None
        else tenacity.stop_after_attempt(policy.retries + 1)
    )

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(state.outcome.exception(), state.attempt_number)

    def after(state: tenacity.RetryCallState) -> None:
        if on_failure is not None:
            on_failure(state.outcome.exception())

    return tenacity.Retrying(
        stop=stop,
        wait=tenacity.wait_random_exponential(
            multiplier=policy.backoff_s, max=policy.max_backoff_s
        ),
        retry=tenacity.retry_if_exception(
            lambda exc: isinstance(exc, Exception) and (retry_if is None or retry_if(exc))
        ),
        after=after,
        before_sleep=before_sleep,
        reraise=True,
    )
