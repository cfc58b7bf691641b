"""The lifecycle's timings (``Policy``) from the settings, and the clock the loops read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.lifecycle import Policy
from worker.settings import PROGRESS_FRESHNESS_POLLS, Settings

# The shortest retry the derived timings go down to.
_FLOOR = timedelta(milliseconds=100)
_ZERO = timedelta(0)


def utc_now() -> datetime:
    return datetime.now(UTC)


def policy_from(settings: Settings) -> Policy:
    """The lifecycle's timings from the settings; the finer ones follow the coarse ones, so
    a deployment (or a test) that shortens the coarse ones gets a consistent whole."""
    default = Policy()
    poll = timedelta(seconds=settings.poll_interval)
    not_found = timedelta(seconds=settings.not_found_window)
    list_lag = timedelta(seconds=settings.list_lag_window)
    return Policy(
        poll_interval=poll,
        rest_poll_interval=timedelta(seconds=settings.rest_poll_interval),
        progress_freshness=timedelta(seconds=settings.progress_freshness)
        if settings.progress_freshness is not None
        else poll * PROGRESS_FRESHNESS_POLLS,
        action_lag=timedelta(seconds=settings.action_lag),
        not_found_window=not_found,
        list_lag_window=list_lag,
        # A few re-reads inside the 404 window; a few scans inside the list lag.
        not_found_retries=tuple(
            min(timedelta(seconds=delay), max(not_found / 4, _FLOOR)) if delay > 0 else _ZERO
            for delay in settings.not_found_retries
        ),
        create_retry=min(default.create_retry, max(list_lag / 4, _FLOOR)),
        # An event held for tiles waits at most one poll. (The lease holding the job while
        # the read runs is renewed every lease / 3 by worker/daemon/presence.py.)
        tiles_wait=min(default.tiles_wait, poll),
        restart_block=timedelta(seconds=settings.restart_block),
        restart_jitter=timedelta(seconds=settings.restart_jitter),
        cost_min_completion=settings.cost_guard_min_completion,
        cost_guard_margin=settings.cost_guard_margin,
    )
