"""A job's identity upstream (its tag, design.md "Idempotent creates") and its first state."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

from worker.lifecycle.cost import CostGuard
from worker.lifecycle.resume_rules import ResumeOn
from worker.lifecycle.state import Echo, JobState, Phase, Retry
from worker.redact import is_secret_key

TAG_PREFIX = "bw"
# A tag as a word of a description (the poller finds the fleet's requests by it).
TAG_WORD = re.compile(rf"\b{TAG_PREFIX}[0-9a-f]{{30}}\b")


def tag_for(fleet_id: str, job_id: str) -> str:
    """The job's tag: ``bw`` + 30 hex digits of SHA-256 over (fleet id, job id).

    Letters and digits only, so every search tokeniser keeps it as one word; the fleet is in
    the hash so fleets sharing an account never find each other's requests.
    """
    # NUL cannot occur in either id, so no two (fleet, job) pairs hash the same input.
    digest = hashlib.sha256(f"{fleet_id}\0{job_id}".encode()).hexdigest()
    return TAG_PREFIX + digest[:30]


def describe(description: str | None, tag: str) -> str:
    """The producer's description with the tag appended as its own word (idempotent)."""
    if not description:
        return tag
    if tag in description.split():
        return description
    return f"{description} {tag}"


def new_job(
    *,
    job_id: str,
    fleet_id: str,
    request: dict[str, Any] | None,
    adopt_id: str | None,
    request_hash: str,
    auto_start: bool,
    deadline: datetime | None,
    max_cost_pu: float | None,
    echo: Echo,
    now: datetime,
    retry_failed: int = 0,
    tenant: str | None = None,
    cost_guard: CostGuard = "spent",
    resume_on: ResumeOn | None = None,
) -> JobState:
    """The state of a job just taken in; the engine steps it with ``Wake()`` next.

    The create payload is stored with the tag already in its ``description``, so whatever
    posts it posts the tagged payload (``describe`` is idempotent should it tag again).
    A non-string description is left alone: the API refuses it anyway.
    """
    payload = request
    if request is not None:
        current = request.get("description")
        if current is None or isinstance(current, str):
            payload = {**request, "description": describe(current, tag_for(fleet_id, job_id))}
    return JobState(
        job_id=job_id,
        fleet_id=fleet_id,
        request_hash=request_hash,
        request=payload,
        adopt_id=adopt_id,
        tenant=tenant,
        auto_start=auto_start,
        start_wanted=auto_start,
        deadline=deadline,
        max_cost_pu=max_cost_pu,
        cost_guard=cost_guard,
        echo=echo,
        accepted_at=now,
        retry=Retry(attempts=retry_failed),
        resume_on=resume_on,
    )


def is_active(state: JobState) -> bool:
    return state.phase is not Phase.ENDED


def holds_credentials(value: Any) -> bool:
    if isinstance(value, dict):
        return any(is_secret_key(k) or holds_credentials(v) for k, v in value.items())
    if isinstance(value, list):
        return any(holds_credentials(v) for v in value)
    return False


def without_credentials(value: Any) -> Any:
    """The create payload without its credentials (S3 keys, GCS credentials): only the
    create sends them (docs/design.md "Credentials in job state"). The tiles are read with
    the worker's own identity, from the delivery URL, which stays."""
    if isinstance(value, dict):
        return {k: without_credentials(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, list):
        return [without_credentials(v) for v in value]
    return value


def forget_credentials(state: JobState) -> JobState:
    """``state`` without the payload's credentials once no create can come: the job has
    ended, or knows its batch request and may make no follow-up (``retry_failed`` 0: a
    follow-up is created from this payload, keys and all). Before, a create (or its retry)
    still needs them."""
    if not holds_credentials(state.request):
        return state
    if state.phase is Phase.PENDING_CREATE:
        return state
    if state.phase is Phase.TRACKING and state.retry.attempts > 0:
        return state
    return state.model_copy(update={"request": without_credentials(state.request)})
