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
        self._room = 0  # new jobs the batch in hand may still take on

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
        outcomes: list[_Outcome] = []
        try:
            with self._pool.connection() as conn, conn.transaction():
                self._room = self._settings.max_in_flight - store.count_active(
                    conn, self._settings.fleet_id
                )
                for message in batch:
                    outcomes.append(self._take_one(conn, message, now))
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

    # -- one message ------------------------------------------------------------------

    def _take_one(self, conn: store.Conn, message: InboundMessage, now: datetime) -> _Outcome:
        echo = Echo(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
        )
        try:
            # A savepoint: whatever one message does is undone alone if it goes wrong.
            with conn.transaction():
                parsed = messages.parse_job_request(message.body, message.content_type)
                if isinstance(parsed, Rejection):
                    self._reject(conn, message, parsed, echo, now)
                    return _Outcome(parsed.action or "", accepted=False)
                return self._route(conn, message, parsed, echo, now)
        except psycopg.OperationalError:
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
                self._reject(conn, message, rejection, echo, now)
            return _Outcome("", accepted=False)

    def _route(
        self,
        conn: store.Conn,
        message: InboundMessage,
        req: JobRequest,
        echo: Echo,
        now: datetime,
    ) -> _Outcome:
        fleet = self._settings.fleet_id
        if req.action == "submit":
            return self._submit(conn, message, req, echo, now)
        if not store.request_action(conn, fleet, req.job_id, req.action, now=now):
            rejection = Rejection(
                code=JOB_NOT_FOUND,
                message=f"no job {req.job_id!r} in fleet {fleet!r}",
                job_id=req.job_id,
                action=req.action,
            )
            self._reject(conn, message, rejection, echo, now)
            return _Outcome(req.action, accepted=False)
        self._accept(conn, req, echo, now)
        return _Outcome(req.action, accepted=True)

    def _submit(
        self,
        conn: store.Conn,
        message: InboundMessage,
        req: JobRequest,
        echo: Echo,
        now: datetime,
    ) -> _Outcome:
        fleet = self._settings.fleet_id
        digest = messages.request_hash(req)
        existing = store.get_job(conn, fleet, req.job_id, for_update=True)
        if existing is None and self._room <= 0:
            return _Outcome("submit", accepted=False, deferred=True)
        if existing is None:
            state = lifecycle.new_job(
                job_id=req.job_id,
                fleet_id=fleet,
                request=req.request,
                adopt_id=req.batch_request_id,
                request_hash=digest,
                auto_start=req.auto_start,
                deadline=req.deadline,
                max_cost_pu=req.max_cost_pu,
                echo=echo,
                now=now,
            )
            if store.insert_job(conn, state, next_run_at=now):
                self._room -= 1
                self._accept(conn, req, echo, now)
                return _Outcome("submit", accepted=True)
            # Another worker's intake inserted it since we looked; its row is committed.
            existing = store.get_job(conn, fleet, req.job_id, for_update=True)
            if existing is None:  # pragma: no cover - a row cannot vanish once inserted
                raise RuntimeError("job row vanished after a conflicting insert")
        if existing.state.request_hash != digest:
            rejection = Rejection(
                code=JOB_CONFLICT,
                message=f"job {req.job_id!r} exists with a different request",
                job_id=req.job_id,
                action="submit",
            )
            self._reject(conn, message, rejection, echo, now)
            return _Outcome("submit", accepted=False)
        self._accept(conn, req, echo, now)
        if existing.last_status_event is not None:
            store_msgs = [existing.last_status_event]
            if echo.reply_to:
                store_msgs.append(_copy_to(existing.last_status_event, echo.reply_to))
            _enqueue(conn, store_msgs)
        return _Outcome("submit", accepted=True)

    # -- events -------------------------------------------------------------------------

    def _accept(self, conn: store.Conn, req: JobRequest, echo: Echo, now: datetime) -> None:
        _enqueue(
            conn,
            events.command_event(
                "accepted",
                fleet_id=self._settings.fleet_id,
                exchange=self._settings.events_exchange,
                worker=self._settings.worker_name,
                now=now,
                job_id=req.job_id,
                action=req.action,
                echo=echo,
            ),
        )

    def _reject(
        self,
        conn: store.Conn,
        message: InboundMessage,
        rejection: Rejection,
        echo: Echo,
        now: datetime,
    ) -> None:
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
        _enqueue(conn, out)


def _copy_to(message: OutboxMessage, reply_to: str) -> OutboxMessage:
    """The same event (same id, same body) for a ``reply_to`` queue, via the default exchange."""
    return OutboxMessage(
        exchange="",
        routing_key=reply_to,
        body=message.body,
        properties=message.properties,
        headers=message.headers,
    )


def _enqueue(conn: store.Conn, out: list[OutboxMessage]) -> None:
    outbox.enqueue(conn, out)
