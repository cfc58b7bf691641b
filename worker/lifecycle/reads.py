"""What a read answers that the tracked, paused and ending phases fold alike: a 404 (within
the window a request just created may answer it, §3.3) and tile counts (never backwards).
"""

from __future__ import annotations

from datetime import timedelta

from worker.lifecycle import followups
from worker.lifecycle.actions import Poll
from worker.lifecycle.draft import Draft, SendKind, end, required
from worker.lifecycle.state import JobError, JobState, Tiles

UPSTREAM_NOT_FOUND = "UPSTREAM_NOT_FOUND"


def missing(d: Draft, action: SendKind | None) -> None:
    s = d.state
    count = s.not_found_count + 1
    d.set(not_found_since=s.not_found_since or d.now, not_found_count=count)
    # A request just created may answer 404 for a while (§3.3, eo-grow's retries).
    created = s.upstream_created or s.intent_at
    if created is None or d.now >= created + d.policy.not_found_window:
        end(d, "FAILED", error=not_found(s.batch_request_id))
        return
    retries = d.policy.not_found_retries
    again = d.now + (retries[min(count, len(retries)) - 1] if retries else timedelta(0))
    if action is not None:
        # The API did not take the action (it did not know the request yet): it is not
        # "sent", so no ACTION_LAG wait; drive._send sends it again from ``again`` on.
        d.set(**{f"{action}_sent_at": None}, resend_not_before=again)
    elif s.resend_not_before is not None:
        d.set(resend_not_before=max(s.resend_not_before, again))
    if again > d.now:
        d.wake_by(again)
    elif action is None:
        d.actions.append(Poll(required(s.batch_request_id), asap=True))


def not_found(batch_request_id: str | None) -> JobError:
    return JobError(
        source="api",
        http_status=404,
        code=UPSTREAM_NOT_FOUND,
        message=f"batch request {batch_request_id} not found",
    )


def merge(s: JobState, seen: Tiles) -> Tiles:
    return merge_tiles(s.tiles, seen) if s.retry.attempt == 0 else followups.merge_tiles(s, seen)


def merge_tiles(known: Tiles | None, seen: Tiles) -> Tiles:
    if known is None:
        return seen
    # The execution database is re-uploaded periodically and features only ever leave
    # PENDING, so an older copy must not move the counts (or the tile metrics) back.
    return Tiles(
        total=seen.total if seen.total is not None else known.total,
        processed=max(known.processed, seen.processed),
        failed=max(known.failed, seen.failed),
    )
