"""Re-runs of FATAL features (``retry_failed``): the pure half.

V2 has no ``restartpartial``: a request can end ``DONE`` with features ``FATAL`` in its
execution database, and the only way to get them is a new request over just those features.
With attempts left, the job makes one: a GeoPackage of the FATAL features' manifest rows
(written by the engine beside the manifest), the same ``processRequest`` and delivery, the
delivery's ``<requestId>`` pinned to the first request's id so the outputs land on the same
paths (``<tileName>`` takes the identifier), and ``overwrite`` (a feature may have written
some of its outputs). The follow-up is created by the path the first request took
(``intent_at``, scan by tag, the list-lag window: docs/design.md "Idempotent creates"), under
a tag of its own per attempt, so a crash anywhere still makes exactly one per attempt.

The job's published view stays one job: its status stays ``PROCESSING`` while a follow-up
runs (the first terminal status is its last), ``tiles`` counts features (a feature DONE on a
later attempt is processed, not failed), ``cost_pu`` sums every request's cost, and the cost
cap covers that sum. Rules and reasons: docs/lifecycle.md "Re-runs of FATAL features".
"""

from __future__ import annotations

import copy
import hashlib
import re
from datetime import datetime
from typing import Any

from worker.lifecycle.jobs import TAG_PREFIX, tag_for
from worker.lifecycle.state import JobError, JobState, PastRequest, Phase, Retry, Tiles

RETRY_UNSUPPORTED = "RETRY_UNSUPPORTED"
RETRY_COST_LIMIT = "RETRY_COST_LIMIT"
RETRY_INPUT_NOT_WRITTEN = "RETRY_INPUT_NOT_WRITTEN"

_PLACEHOLDER = re.compile(r"<[^>]*>")
# A plain delivery URL is this template (batch-v2-api.md §5.3).
_PLAIN_TEMPLATE = "/<requestId>/<tileName>/<outputId>.<format>"


def attempt_tag(fleet_id: str, job_id: str, attempt: int) -> str:
    """The tag of the job's follow-up number ``attempt`` (``bw`` + 30 hex digits).

    Three parts hashed where the first request's tag hashes two, so no follow-up tag is
    ever any job's first tag; a follow-up is not mistaken for a duplicate of its job.
    """
    digest = hashlib.sha256(f"{fleet_id}\0{job_id}\0{attempt}".encode()).hexdigest()
    return TAG_PREFIX + digest[:30]


def job_tags(fleet_id: str, job_id: str, attempt: int) -> list[str]:
    """Every tag the job's requests carry up to follow-up ``attempt``, first to last."""
    return [
        tag_for(fleet_id, job_id),
        *(attempt_tag(fleet_id, job_id, n) for n in range(1, attempt + 1)),
    ]


def request_tag(state: JobState) -> str:
    """The tag of the job's current batch request (the one a create scan looks for)."""
    if state.retry.attempt == 0:
        return tag_for(state.fleet_id, state.job_id)
    return attempt_tag(state.fleet_id, state.job_id, state.retry.attempt)


def total_cost(state: JobState) -> float | None:
    """What the job has cost: every ended request's cost plus the current one's."""
    past = sum(p.cost_pu for p in state.retry.past)
    if state.cost_pu is None:
        return past if state.retry.past else None
    return past + state.cost_pu


def published_status(state: JobState) -> str | None:
    """The status a tracked job publishes: a follow-up's own early statuses are the job's
    ``PROCESSING`` (its features are still being processed), its end is the job's end."""
    status = state.upstream_status
    if state.retry.attempt > 0 and status in ("CREATED", "ANALYSING", "ANALYSIS_DONE"):
        return "PROCESSING"
    return status


def follow_up_due(state: JobState) -> bool:
    """Processing ended DONE with FATAL features, and an attempt is left."""
    tiles, retry = state.tiles, state.retry
    return (
        state.upstream_status == "DONE"
        and tiles is not None
        and tiles.failed > 0
        and retry.attempt < retry.attempts
    )


def why_not(state: JobState) -> JobError | None:
    """Why a due follow-up cannot be made, or None when it can."""
    request = state.request
    if request is None or state.adopt_id is not None:
        # The task echoes its delivery credentials masked (§4.1): nothing to post again.
        return _skip(RETRY_UNSUPPORTED, "an adopted batch request cannot be re-run in part")
    output = request.get("output")
    if not isinstance(output, dict) or output.get("type") != "raster":
        # A Zarr delivery fails when anything exists there (§5.3): no overwrite to ask for.
        return _skip(RETRY_UNSUPPORTED, "only a raster output can be re-run in part")
    s3 = (output.get("delivery") or {}).get("s3")
    if not isinstance(s3, dict) or not str(s3.get("url", "")).startswith("s3://"):
        return _skip(RETRY_UNSUPPORTED, "the follow-up's input goes to an s3:// delivery only")
    cost = total_cost(state)
    if state.max_cost_pu is not None and cost is not None and cost >= state.max_cost_pu:
        return _skip(RETRY_COST_LIMIT, f"the job has spent its cap ({cost:g} PU)")
    return None


def _skip(code: str, message: str) -> JobError:
    return JobError(source="worker", code=code, message=message)


def begin(state: JobState, *, url: str, features: int, now: datetime) -> JobState:
    """The job with its current request ended and its follow-up to create next.

    The create fields start afresh (no intent yet: the first create attempt POSTs, every
    later one scans for the follow-up's tag first), the tracking fields too; the job's
    tiles stay as they are (features, not requests).
    """
    retry = state.retry
    assert state.batch_request_id is not None and state.request is not None
    tiles = state.tiles or Tiles()
    ended = PastRequest(
        batch_request_id=state.batch_request_id,
        attempt=retry.attempt,
        status=state.upstream_status or "DONE",
        cost_pu=state.cost_pu or 0.0,
        features=retry.covering if retry.attempt > 0 else None,
        processed=tiles.processed - retry.base_processed,
        failed=tiles.failed,
    )
    first_id = retry.past[0].batch_request_id if retry.past else state.batch_request_id
    attempt = retry.attempt + 1
    request = follow_up_request(
        state.request,
        first_request_id=first_id,
        input_url=url,
        tag=attempt_tag(state.fleet_id, state.job_id, attempt),
        drop=frozenset({tag_for(state.fleet_id, state.job_id), request_tag(state)}),
    )
    return state.model_copy(
        update={
            "phase": Phase.PENDING_CREATE,
            "request": request,
            "retry": Retry(
                attempts=retry.attempts,
                attempt=attempt,
                past=(*retry.past, ended),
                covering=features,
                base_processed=tiles.processed,
            ),
            "intent_at": None,
            "create_attempts": 0,
            "create_doubtful": False,
            "batch_request_id": None,
            "upstream_created": None,
            "upstream_status": None,
            "furthest_rank": 0,
            "completion": 0.0,
            "cost_pu": None,
            "start_wanted": True,
            "analyse_sent_at": None,
            "start_sent_at": None,
            "stop_sent_at": None,
            "analysis_done_at": None,
            "stop_reason": None,
            "not_found_since": None,
            "ending_since": None,
            "stopped_reason": None,
            "error": None,
            "last_seen_at": now,
        }
    )


def follow_up_request(
    request: dict[str, Any],
    *,
    first_request_id: str,
    input_url: str,
    tag: str,
    drop: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The create payload of a follow-up: ``request`` over the GeoPackage at ``input_url``.

    The input reads with the delivery's own credentials (the file sits in the delivery
    bucket); the delivery URL is made a template if it was a plain folder and its
    ``<requestId>`` becomes the first request's id, so every output lands where the first
    request put (or would have put) it.
    """
    payload = copy.deepcopy(request)
    output = payload["output"]
    s3 = output["delivery"]["s3"]
    credentials = {k: v for k, v in s3.items() if k != "url"}
    payload["input"] = {"type": "geopackage", "features": {"s3": {**credentials, "url": input_url}}}
    url = str(s3["url"]).rstrip("/")
    if not _PLACEHOLDER.search(url):
        url += _PLAIN_TEMPLATE
    s3["url"] = url.replace("<requestId>", first_request_id)
    output["overwrite"] = True
    description = payload.get("description")
    # The producer's words, with the tags of the job's earlier requests swapped for this
    # one's: a follow-up found by an earlier tag would pass for that request (or a duplicate).
    words = description.split() if isinstance(description, str) else []
    payload["description"] = " ".join([*(w for w in words if w not in drop), tag])
    return payload


def merge_tiles(state: JobState, seen: Tiles) -> Tiles:
    """The job's tiles with a follow-up's own counts read: features, not requests.

    Of the features the follow-up covers, the DONE ones join the processed and leave the
    failed; those not DONE (yet) stay failed. Neither count moves back on an older copy of
    the execution database (processed never falls, failed never rises).
    """
    known = state.tiles or Tiles()
    retry = state.retry
    processed = retry.base_processed + min(seen.processed, retry.covering)
    failed = max(0, retry.covering - seen.processed)
    return Tiles(
        total=known.total,
        processed=max(known.processed, processed),
        failed=min(known.failed, failed),
    )


def end_after_failed_create(state: JobState, error: JobError) -> JobState:
    """A follow-up that could not be created: the job ends as its last request did, with
    the reason beside it (the features it would have covered stay failed)."""
    last = state.retry.past[-1]
    return state.model_copy(
        update={
            "batch_request_id": last.batch_request_id,
            "upstream_status": last.status,
            "retry": state.retry.model_copy(update={"skipped": error}),
        }
    )


def batch_requests(state: JobState) -> list[dict[str, Any]]:
    """Every batch request of the job, first to current, for its events."""
    rows = [
        {
            "batch_request_id": p.batch_request_id,
            "attempt": p.attempt,
            "status": p.status,
            "cost_pu": p.cost_pu,
            "features": p.features,
            "processed": p.processed,
            "failed": p.failed,
        }
        for p in state.retry.past
    ]
    if state.batch_request_id is not None and (
        not rows or rows[-1]["batch_request_id"] != state.batch_request_id
    ):
        retry, tiles = state.retry, state.tiles or Tiles()
        rows.append(
            {
                "batch_request_id": state.batch_request_id,
                "attempt": retry.attempt,
                "status": state.upstream_status or state.status,
                "cost_pu": state.cost_pu or 0.0,
                "features": retry.covering if retry.attempt > 0 else None,
                "processed": tiles.processed - retry.base_processed,
                "failed": tiles.failed,
            }
        )
    return rows
