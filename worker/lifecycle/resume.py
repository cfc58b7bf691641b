"""Resume by policy: a stop the job did not ask for becomes a pause, then a START.

The API stops a processing request on its own for two reasons (batch-v2-api.md §3.2):
``UNHEALTHY`` (the service's trouble) and ``OUT_OF_PU`` (the account's). A job whose
``resume_on`` names the reason does not end then: it publishes ``PAUSED`` (not final) with
when it will try again, and STARTs the same batch request once the restart block is over
(START is refused for 30 minutes after a stop). ``UNHEALTHY`` resumes at most ``attempts``
times, each after the block and a jitter (so a fleet stopped by one incident does not
restart in one burst); ``OUT_OF_PU`` waits for an operator's ``resume`` (a top-up) or the
configured date (the monthly reset).

Pure, like the rest of the lifecycle: the rules here decide on the state and ``now``; the
machine (``machine.py``) calls them where a ``STOPPED`` would end the job, and hands a
paused job's observations to them.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from worker.lifecycle.resume_rules import OUT_OF_PU, UNHEALTHY, Pause
from worker.lifecycle.state import JobState


def jitter(job_id: str, attempt: int, spread: timedelta) -> timedelta:
    """A delay in [0, spread) fixed by the job and attempt: pure, and spread over a fleet."""
    if spread <= timedelta(0):
        return timedelta(0)
    digest = hashlib.sha256(f"{job_id}\0{attempt}".encode()).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    return spread * share


def attempts_used(state: JobState, reason: str) -> int:
    return state.resumed.count(reason)


def pause_for(
    state: JobState,
    api_reason: str | None,
    now: datetime,
    *,
    restart_block: timedelta,
    restart_jitter: timedelta,
) -> Pause | None:
    """The pause a ``STOPPED`` read with the API's ``api_reason`` turns into; None: it ends
    the job as before (no rule, attempts used up, the worker asked for the stop itself, or
    the deadline comes before the job could go on)."""
    rules = state.resume_on
    if rules is None or state.stop_reason is not None or state.cancel_wanted:
        return None
    earliest = now + restart_block
    resume_at: datetime | None
    if api_reason == UNHEALTHY and rules.UNHEALTHY is not None:
        used = attempts_used(state, UNHEALTHY)
        if used >= rules.UNHEALTHY.attempts:
            return None
        resume_at = earliest + jitter(state.job_id, used, restart_jitter)
    elif api_reason == OUT_OF_PU and rules.OUT_OF_PU is not None:
        until = rules.OUT_OF_PU.until
        resume_at = None if until is None else max(until, earliest)
    else:
        return None
    if state.deadline is not None and resume_at is not None and resume_at >= state.deadline:
        return None  # it could not go on before its deadline: end it now, honestly
    return Pause(
        reason=api_reason,
        since=now,
        earliest=earliest,
        resume_at=resume_at,
        cost_pu=state.cost_pu or 0.0,
    )


def restart_due(pause: Pause, now: datetime) -> bool:
    """The START of this pause is to be sent now."""
    at = pause.next_start_at
    return pause.restart_sent_at is None and at is not None and now >= at


def restarted(pause: Pause, status: str, cost_pu: float) -> bool:
    """A read shows the request left the stop: any status but ``STOPPED`` (the START took
    effect, or someone else started it), or a ``STOPPED`` that billed more since the
    pause (the restart ran and stopped again between two reads)."""
    if status != "STOPPED":
        return True
    return pause.restart_sent_at is not None and cost_pu > pause.cost_pu
