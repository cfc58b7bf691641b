"""Job-request messages → job rows and outbox rows, one transaction per batch.

The consumer acks a batch only after ``handle_batch`` returns, i.e. after the commit: a
crash before it leaves the messages to be redelivered, and taking them in again is
idempotent (same job id and request → no new job).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from worker import events, lifecycle, messages, outbox, store
from worker.consumer import InboundMessage, IntakeUnavailable
from worker.events import OutboxMessage
from worker.lifecycle import Echo
from worker.messages import JobRequest, Rejection
from worker.settings import Settings

log = logging.getLogger(__name__)

JOB_CONFLICT = "JOB_CONFLICT"
JOB_NOT_FOUND = "JOB_NOT_FOUND"
INTERNAL_ERROR = "INTERNAL_ERROR"


class CommandMetrics(Protocol):
    def command(self, action: str, outcome: str) -> None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Outcome:
    action: str
    accepted: bool
    deferred: bool = False  # a new job while the fleet is at MAX_IN_FLIGHT: try again later


class Intake:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        *,
        metrics: CommandMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._clock = clock

    def handle_batch(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        """Take a batch in, in one transaction; return after it commits.

        Returns the messages deferred: new jobs beyond ``MAX_IN_FLIGHT`` active jobs, which
        the consumer holds (unacked, no delivery attempt spent) and offers again later.
        Commands for existing jobs (re-submits, start, cancel) are never deferred.
        An unreachable database raises IntakeUnavailable (nothing is acked; the consumer
        holds the batch and retries); anything a single message provokes is contained to
        that message, which is rejected.
        """
        if not batch:
            return []
        now = self._clock()
        try:
            with self._pool.connection() as conn:
                outcomes = self._take_in(conn, batch, now)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # Nothing was committed; the consumer keeps the batch and tries it again.
            raise IntakeUnavailable(f"the database is unavailable ({type(exc).__name__})") from exc
        if self._metrics is not None:
            for outcome in outcomes:
                if not outcome.deferred:
                    self._metrics.command(
                        outcome.action, "accepted" if outcome.accepted else "rejected"
                    )
        return [m for m, o in zip(batch, outcomes, strict=True) if o.deferred]

    def _take_in(
        self, conn: store.Conn, batch: list[InboundMessage], now: datetime
    ) -> list[_Outcome]:
        """The whole batch in a handful of round trips; one message at a time (each in a
        savepoint) only when something in the batch goes wrong."""
        for _ in range(2):
            try:
                with conn.transaction():
                    return self._take(conn, batch, now)
            except _Raced:
                continue  # another intake inserted one of these jobs meanwhile: look again
            except psycopg.OperationalError:
                raise
            except Exception:
                log.exception("a batch of %d job request(s) failed; one by one", len(batch))
                break
        with conn.transaction():
            return [self._take_alone(conn, message, now) for message in batch]

    def _take_alone(self, conn: store.Conn, message: InboundMessage, now: datetime) -> _Outcome:
        try:
            # A savepoint: whatever one message does is undone alone if it goes wrong.
            with conn.transaction():
                return self._take(conn, [message], now)[0]
        except (psycopg.OperationalError, _Raced):
            raise
        except Exception as exc:
            # A bug provoked by this input must not stop the queue: reject it whole.
            log.exception("could not take in a job request (%s)", type(exc).__name__)
            rejection = Rejection(
                code=INTERNAL_ERROR,
                message="the worker could not process this message",
                job_id=None,
                action=None,
            )
            with conn.transaction():
                outbox.enqueue(conn, self._rejected(message, rejection, _echo(message), now))
            return _Outcome("", accepted=False)

    def _take(self, conn: store.Conn, batch: list[InboundMessage], now: datetime) -> list[_Outcome]:
        """Decide every message in memory, in order, then write it all at once."""
        fleet = self._settings.fleet_id
        room = self._settings.max_in_flight - store.count_active(conn, fleet)
        parsed = [messages.parse_job_request(m.body, m.content_type) for m in batch]
        known = store.intake_views(
            conn, fleet, {p.job_id for p in parsed if isinstance(p, JobRequest)}
        )
        new_jobs: list[lifecycle.JobState] = []
        requests: list[tuple[str, str]] = []
        out: list[OutboxMessage] = []
        outcomes: list[_Outcome] = []
        for message, req in zip(batch, parsed, strict=True):
            echo = _echo(message)
            if isinstance(req, Rejection):
                out += self._rejected(message, req, echo, now)
                outcomes.append(_Outcome(req.action or "", accepted=False))
                continue
            view = known.get(req.job_id)
            refusal: Rejection | None = None
            if req.action == "submit":
                digest = messages.request_hash(req)
                if view is None and room <= 0:
                    outcomes.append(_Outcome("submit", accepted=False, deferred=True))
                    continue
                if view is None:
                    new_jobs.append(self._new_job(req, digest, echo, now))
                    known[req.job_id] = store.IntakeView(digest, None)
                    room -= 1
                elif view.request_hash != digest:
                    refusal = Rejection(
                        code=JOB_CONFLICT,
                        message=f"job {req.job_id!r} exists with a different request",
                        job_id=req.job_id,
                        action="submit",
                    )
            elif view is None:
                refusal = Rejection(
                    code=JOB_NOT_FOUND,
                    message=f"no job {req.job_id!r} in fleet {fleet!r}",
                    job_id=req.job_id,
                    action=req.action,
                )
            else:
                requests.append((req.job_id, req.action))
            if refusal is not None:
                out += self._rejected(message, refusal, echo, now)
                outcomes.append(_Outcome(req.action, accepted=False))
                continue
            out += self._accepted(req, echo, now)
            if req.action == "submit" and view is not None and view.last_status_event:
                # Idempotent re-submit: the job's latest status again, same id.
                out.append(view.last_status_event)
                if echo.reply_to:
                    out.append(_copy_to(view.last_status_event, echo.reply_to))
            outcomes.append(_Outcome(req.action, accepted=True))
        if len(store.insert_jobs(conn, new_jobs, next_run_at=now)) < len(new_jobs):
            raise _Raced
        store.request_actions(conn, fleet, requests, now=now)
        outbox.enqueue(conn, out)
        return outcomes

    def _new_job(
        self, req: JobRequest, digest: str, echo: Echo, now: datetime
    ) -> lifecycle.JobState:
        return lifecycle.new_job(
            job_id=req.job_id,
            fleet_id=self._settings.fleet_id,
            request=req.request,
            adopt_id=req.batch_request_id,
            request_hash=digest,
            auto_start=req.auto_start,
            deadline=req.deadline,
            max_cost_pu=req.max_cost_pu,
            echo=echo,
            now=now,
        )

    # -- events -------------------------------------------------------------------------

    def _accepted(self, req: JobRequest, echo: Echo, now: datetime) -> list[OutboxMessage]:
        return events.command_event(
            "accepted",
            fleet_id=self._settings.fleet_id,
            exchange=self._settings.events_exchange,
            worker=self._settings.worker_name,
            now=now,
            job_id=req.job_id,
            action=req.action,
            echo=echo,
        )

    def _rejected(
        self, message: InboundMessage, rejection: Rejection, echo: Echo, now: datetime
    ) -> list[OutboxMessage]:
        """The rejected event, and the message whole for the DLQ with the reason."""
        log.info(
            "rejected a job request: %s (job %s, action %s)",
            rejection.code,
            rejection.job_id,
            rejection.action,
        )
        out = events.command_event(
            "rejected",
            fleet_id=self._settings.fleet_id,
            exchange=self._settings.events_exchange,
            worker=self._settings.worker_name,
            now=now,
            job_id=rejection.job_id,
            action=rejection.action,
            echo=echo,
            rejection=rejection,
        )
        out.append(
            events.dead_letter(
                message.body,
                message.properties,
                message.headers,
                dlq=self._settings.dlq,
                rejection=rejection,
                now=now,
            )
        )
        return out


class _Raced(Exception):
    """A job this batch meant to create was created by another intake meanwhile."""


def _echo(message: InboundMessage) -> Echo:
    return Echo(
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
    )


def _copy_to(message: OutboxMessage, reply_to: str) -> OutboxMessage:
    """The same event (same id, same body) for a ``reply_to`` queue, via the default exchange."""
    return OutboxMessage(
        exchange="",
        routing_key=reply_to,
        body=message.body,
        properties=message.properties,
        headers=message.headers,
    )
