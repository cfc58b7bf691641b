"""How the client retries (batch-v2-api.md §10, §11, §3.3), built on tenacity.

- 429: wait what ``Retry-After`` says (milliseconds, §10) or ``default_retry_after``.
- 5xx and transport failures: exponential back-off with full jitter, bounded in attempts
  and in total time; only for calls that are safe to repeat (a create is not: it retries
  only what surely never reached the server).
- 404 on a task created moments ago: retried every ``not_found_delay`` while the task is
  younger than ``not_found_window`` (the API's read side lags its write side).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception
from tenacity.stop import stop_before_delay
from tenacity.wait import wait_random_exponential

from worker.api.errors import ApiError, NotFound, RateLimited

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A 429 wait is stretched by up to this share, so a fleet told the same Retry-After
# does not come back in the same millisecond.
_RETRY_AFTER_SPREAD = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # per call, for 429, 5xx and transport failures
    max_total_seconds: float = 120.0  # no retry sleep may end past this, from the first try
    backoff_base: float = 0.5  # seconds; exponential back-off multiplier (full jitter)
    backoff_cap: float = 30.0  # seconds; the longest single back-off
    default_retry_after: float = 30.0  # seconds, for a 429 without Retry-After (§10.1)
    not_found_window: float = 60.0  # seconds after creation during which a 404 is transient
    not_found_delay: float = 2.0  # seconds between tries while a 404 is transient

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.max_total_seconds, self.backoff_base, self.backoff_cap) < 0:
            raise ValueError("durations must not be negative")


def _exception(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


class _Wait:
    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._backoff = wait_random_exponential(
            multiplier=policy.backoff_base, max=policy.backoff_cap
        )

    def __call__(self, state: RetryCallState) -> float:
        exc = _exception(state)
        if isinstance(exc, RateLimited):
            base = (
                exc.retry_after if exc.retry_after is not None else self._policy.default_retry_after
            )
            return base * (1.0 + random.uniform(0.0, _RETRY_AFTER_SPREAD))
        if isinstance(exc, NotFound):
            return self._policy.not_found_delay
        return float(self._backoff(state))


class _Stop:
    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._too_late = stop_before_delay(policy.max_total_seconds)

    def __call__(self, state: RetryCallState) -> bool:
        if isinstance(_exception(state), NotFound):
            return False  # bounded by the not-found window (the caller's retry predicate)
        return state.attempt_number >= self._policy.max_attempts or self._too_late(state)


def _log_retry(endpoint: str) -> Callable[[RetryCallState], None]:
    def log(state: RetryCallState) -> None:
        sleep = state.upcoming_sleep
        logger.warning(
            "%s failed (%s); retry %d in %.2f s",
            endpoint,
            _exception(state),
            state.attempt_number,
            sleep,
        )

    return log


def call_with_retries(
    policy: RetryPolicy,
    endpoint: str,
    attempt: Callable[[], T],
    should_retry: Callable[[ApiError], bool],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``attempt`` until it returns, or raise its last ApiError once retries are over."""
    retrying = Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, ApiError) and should_retry(e)),
        stop=_Stop(policy),
        wait=_Wait(policy),
        sleep=sleep,
        reraise=True,
        before_sleep=_log_retry(endpoint),
    )
    return retrying(attempt)
