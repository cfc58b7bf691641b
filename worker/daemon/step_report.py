"""What a saved step tells the world besides its events: one log line per status change,
and the engine's metrics (tiles, follow-ups, pauses, withheld starts, finished jobs)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from worker.lifecycle import JobState, Phase

log = logging.getLogger("worker.daemon.engine")  # the engine's lines, under its name


class EngineMetrics(Protocol):
    """The ``worker.metrics.Metrics`` methods the engine calls."""

    def job_finished(
        self,
        status: str,
        reason: str | None,
        duration_seconds: float | None,
        tenant: str | None = None,
    ) -> None: ...
    def set_in_flight(self, counts: dict[str, int]) -> None: ...
    def tiles(self, processed_delta: int, failed_delta: int) -> None: ...
    def duplicate_stopped(self) -> None: ...
    def follow_up(self, recovered_delta: int, *, created: bool) -> None: ...
    def job_paused(self, reason: str) -> None: ...
    def status_lag(self, seconds: float) -> None: ...
    def cost_share(self, share: float) -> None: ...
    def start_withheld(self) -> None: ...


def report(previous: JobState, state: JobState, metrics: EngineMetrics | None) -> None:
    """Log and count what a saved step changed from ``previous`` to ``state``."""
    if state.status != previous.status or (
        state.phase is Phase.ENDED and previous.phase is not Phase.ENDED
    ):
        # One line per status change, the fields an operator filters on.
        why = state.stopped_reason or (state.error.code if state.error else None)
        log.info(
            "job %s: %s%s",
            state.job_id,
            state.status,
            f" ({why})" if why else "",
            extra=job_fields(state),
        )
    if metrics is None:
        return
    old_tiles, new_tiles = previous.tiles, state.tiles
    if new_tiles is not None:
        processed = new_tiles.processed - (old_tiles.processed if old_tiles else 0)
        failed = new_tiles.failed - (old_tiles.failed if old_tiles else 0)
        if processed > 0 or failed > 0:
            metrics.tiles(max(processed, 0), max(failed, 0))
        if state.retry.attempt > 0:
            # A follow-up's processed features were all failed before: recovered.
            created = previous.phase is Phase.PENDING_CREATE and state.phase is Phase.TRACKING
            if created or processed > 0:
                metrics.follow_up(max(processed, 0), created=created)
    if state.pause is not None and previous.pause is None:
        metrics.job_paused(state.pause.reason)
    if state.cost_held and not previous.cost_held:
        metrics.start_withheld()
    if state.phase is Phase.ENDED and previous.phase is not Phase.ENDED:
        reason = state.stopped_reason or (state.error.code if state.error else None)
        duration = (state.ended_at - state.accepted_at).total_seconds() if state.ended_at else None
        metrics.job_finished(state.status or "UNKNOWN", reason, duration, state.tenant)


def job_fields(state: JobState) -> dict[str, Any]:
    return {
        "job_id": state.job_id,
        "batch_request_id": state.batch_request_id,
        "status": state.status,
    }
