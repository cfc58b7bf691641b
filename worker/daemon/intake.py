"""Job-request messages → job rows and outbox rows, one transaction per batch.

The consumer acks a batch only after its transaction has committed (the last step of
``take_in_steps``, or ``handle_batch`` returning): a crash before it leaves the messages to
be redelivered, and taking them in again is idempotent (same job id and request → no new
job). What becomes of each message (inserted, requested, refused, held) is decided in
worker/daemon/admission.py, a pure function of the batch and the lookup's answer; this
module reads the batch, looks up, performs the decisions and commits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar, cast

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from worker import lifecycle
from worker.daemon import admission
from worker.daemon.admission import ACCEPTED, HELD, REJECTED, Decision
from worker.daemon.inbound import InboundMessage, IntakeUnavailable, TakeSteps
from worker.lifecycle import Echo
from worker.settings import Settings
from worker.store import db, jobs, outbox
from worker.wire import events, job_requests, properties
from worker.wire.job_requests import JobRequest, RejectCode, Rejection
from worker.wire.outgoing import OutboxMessage

log = logging.getLogger(__name__)


class CommandMetrics(Protocol):
    def command(self, action: str, outcome: str, tenant: str | None = None) -> None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Read:
    """One message as read ahead of its transaction: everything that needs no database.

    For a valid request the ``command.accepted`` event is built already, and for a submit
    its hash and, should the job turn out to be new, its row: in a burst nearly every
    message is a new submit, and building these is most of intake's Python.
    """

    message: InboundMessage
    echo: Echo
    request: JobRequest | Rejection
    digest: str = ""
    row: jobs.JobRow | None = None
    accepted: tuple[OutboxMessage, ...] = ()

    @property
    def tenant(self) -> str | None:
        return self.request.tenant if isinstance(self.request, JobRequest) else None


@dataclass(frozen=True)
class ReadBatch:
    """A batch read by :meth:`Intake.read`, to be taken in by :meth:`Intake.take`."""

    messages: list[InboundMessage]
    reads: list[_Read]
    now: datetime


class Intake:
    """Job-request messages into the job table and the outbox, a batch per transaction.

    Two halves, so that a consumer can read the next batch while this one's transaction
    runs (worker/daemon/consumer.py): ``read`` is pure work (parse, validate, hash, build rows and
    events) and never touches the database; ``take`` is the transaction.
    ``handle_batch`` is both, one after the other.
    """

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
        self._tenancy = admission.Tenancy.of(settings)
        # The fleet's resume_on, checked in full here: a bad RESUME_ON fails the start.
        self._resume_on = (
            None
            if settings.resume_on is None
            else lifecycle.ResumeOn.model_validate(settings.resume_on)
        )

    def handle_batch(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        return self.take(self.read(batch))

    def read(self, batch: list[InboundMessage]) -> ReadBatch:
        """Everything about ``batch`` that needs no database; never raises on input."""
        now = self._clock()
        return ReadBatch(batch, [self._read(message, now) for message in batch], now)

    def take(self, batch: ReadBatch) -> list[InboundMessage]:
        """Take a batch in, in one transaction; return after it commits.

        Returns the messages deferred: new jobs beyond ``MAX_IN_FLIGHT`` active jobs, which
        the consumer holds (unacked, no delivery attempt spent) and offers again later.
        Commands for existing jobs (re-submits, start, cancel) are never deferred.
        An unreachable database raises IntakeUnavailable (nothing is acked; the consumer
        holds the batch and retries); anything a single message provokes is contained to
        that message, which is rejected.
        """
        return run_steps(self.take_in_steps(batch))

    def take_in_steps(self, batch: ReadBatch) -> TakeSteps:
        """``take`` in steps: each ``next()`` sends statements and returns without waiting
        for their answers, which the next step reads. The caller works between steps (the
        consumer reads its next batch) while PostgreSQL works on the statements; the last
        step ends with ``StopIteration`` carrying the messages deferred."""
        if not batch.reads:
            return []
        try:
            with self._pool.connection() as conn:
                decisions = yield from self._take_in(conn, batch.reads, batch.now)
                if any(len(m.body) > db.LARGE_MESSAGE_BYTES for m in batch.messages):
                    db.discard(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # Nothing was committed; the consumer keeps the batch and tries it again.
            raise IntakeUnavailable(f"the database is unavailable ({type(exc).__name__})") from exc
        if self._metrics is not None:
            for read, decision in zip(batch.reads, decisions, strict=True):
                if decision.outcome != HELD:
                    self._metrics.command(decision.action, decision.outcome, read.tenant)
        return [m for m, d in zip(batch.messages, decisions, strict=True) if d.outcome == HELD]

    def _read(self, message: InboundMessage, now: datetime) -> _Read:
        echo = _echo(message)
        try:
            refused = _refused_properties(message)
            if refused is not None:
                # Nothing of the producer's properties is echoed: they are the problem.
                return _Read(message, Echo(), refused)
            return self._read_one(message, echo, now)
        except Exception as exc:
            # A bug provoked by this input must not hold up the batch it came in: the
            # message alone is rejected (dead-lettered with the reason), as in a transaction.
            log.exception("could not read a job request (%s)", type(exc).__name__)
            return _Read(message, echo, _internal_error())

    def _read_one(self, message: InboundMessage, echo: Echo, now: datetime) -> _Read:
        req = job_requests.parse_job_request(message.body, message.content_type)
        if isinstance(req, JobRequest):
            req = admission.resolve_tenant(req, message.properties.get("user_id"), self._tenancy)
        if isinstance(req, Rejection):
            return _Read(message, echo, req)
        accepted = tuple(self._accepted(req, echo, now))
        if req.action != "submit":
            return _Read(message, echo, req, accepted=accepted)
        digest = job_requests.request_hash(req)
        row = jobs.job_row(self._new_job(req, digest, echo, now))
        return _Read(message, echo, req, digest, row, accepted)

    def _take_in(
        self, conn: jobs.Conn, reads: list[_Read], now: datetime
    ) -> Generator[None, None, list[Decision]]:
        """The whole batch in one transaction in pipeline mode (statements go out together,
        answers are read a step later); one message at a time (each in a savepoint) only
        when something in the batch goes wrong."""
        for attempt in range(2):
            try:
                if attempt == 0:
                    return (yield from self._take_committing_early(conn, reads, now))
                with conn.pipeline(), conn.transaction():
                    return run_steps(self._take(conn, reads, now))
            except _Raced:
                continue  # another intake inserted one of these jobs meanwhile: look again
            except psycopg.OperationalError:
                raise
            except Exception:
                log.exception("a batch of %d job request(s) failed; one by one", len(reads))
                break
        with conn.transaction():
            return [self._take_alone(conn, read, now) for read in reads]

    def _take_committing_early(
        self, conn: jobs.Conn, reads: list[_Read], now: datetime
    ) -> Generator[None, None, list[Decision]]:
        """``_take`` with its COMMIT sent right behind the writes, before any answer is read.

        The commit (a WAL flush) then runs while the consumer reads the next batch, instead
        of being waited for after it. Nothing may be decided from the writes' answers, so
        a job another intake created meanwhile fails the insert (``_Raced``) rather than
        being left out, and a failed statement leaves the COMMIT unrun: the transaction is
        rolled back whole. psycopg's transaction block would wait for every answer before
        sending its COMMIT, so this one is spelled out, on a connection in autocommit mode
        for its duration (psycopg would otherwise begin a transaction, and wait, itself).
        """
        conn.autocommit = True
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                return (yield from self._take(conn, reads, now, commit=True))
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name == jobs.JOBS_KEY:
                raise _Raced from exc
            raise
        finally:
            if not conn.broken and not conn.closed:
                if conn.pgconn.transaction_status != TransactionStatus.IDLE:
                    conn.rollback()  # a failed or abandoned transaction
                conn.autocommit = False

    def _take_alone(self, conn: jobs.Conn, read: _Read, now: datetime) -> Decision:
        try:
            # A savepoint: whatever one message does is undone alone if it goes wrong.
            with conn.transaction():
                return run_steps(self._take(conn, [read], now))[0]
        except (psycopg.OperationalError, _Raced):
            raise
        except Exception as exc:
            # A bug provoked by this input must not stop the queue: reject it whole.
            log.exception("could not take in a job request (%s)", type(exc).__name__)
            rejection = _internal_error()
            with conn.transaction():
                outbox.enqueue(conn, self._rejected(read.message, rejection, read.echo, now))
            return Decision("", REJECTED, refusal=rejection)

    def _take(
        self, conn: jobs.Conn, reads: list[_Read], now: datetime, *, commit: bool = False
    ) -> Generator[None, None, list[Decision]]:
        """Decide every message in order against what the database holds, then write it all
        at once. Two steps: the lookup, then the writes (and, with ``commit``, the COMMIT of
        a transaction begun by the caller)."""
        fleet = self._settings.fleet_id
        requests_ok = [r.request for r in reads if isinstance(r.request, JobRequest)]
        lookup = jobs.start_intake_lookup(
            conn,
            fleet,
            {req.job_id for req in requests_ok},
            {req.batch_request_id for req in requests_ok if req.batch_request_id is not None},
        )
        yield
        found = lookup()
        decisions = admission.decide(
            reads,
            active=found.active,
            known=found.known,
            max_in_flight=self._settings.max_in_flight,
            fleet_id=fleet,
            origins=found.origins,
            tenancy=self._tenancy,
        )
        new_jobs: list[jobs.JobRow] = []
        requests: list[tuple[str, str]] = []
        out: list[OutboxMessage] = []
        for read, decision in zip(reads, decisions, strict=True):
            if decision.outcome == ACCEPTED:
                out += read.accepted
                if decision.insert is not None:
                    new_jobs.append(decision.insert)
                elif decision.request is not None:
                    requests.append(decision.request)
                elif decision.republish is not None:
                    # Idempotent re-submit: the job's latest status again, same id.
                    out.append(decision.republish)
                    if read.echo.reply_to:
                        out.append(events.reply_copy(decision.republish, read.echo.reply_to))
            elif decision.refusal is not None:
                out += self._rejected(
                    read.message, decision.refusal, read.echo, now, tenant=read.tenant
                )
        # In statement order on the server: a cancel may be for a job this batch creates.
        inserted = jobs.start_insert_jobs(conn, new_jobs, next_run_at=now, or_fail=commit)
        jobs.request_actions(conn, fleet, requests, now=now)
        outbox.enqueue(conn, out)
        if commit:
            conn.execute("COMMIT")
        db.send_all(conn)
        yield
        if len(inserted()) < len(new_jobs):
            raise _Raced
        return decisions

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
            retry_failed=(
                req.retry_failed if req.retry_failed is not None else self._settings.retry_failed
            ),
            tenant=req.tenant,
            resume_on=req.resume_on if req.resume_on is not None else self._resume_on,
            cost_guard=req.cost_guard or self._settings.cost_guard,
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
            tenant=req.tenant,
        )

    def _rejected(
        self,
        message: InboundMessage,
        rejection: Rejection,
        echo: Echo,
        now: datetime,
        *,
        tenant: str | None = None,
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
            tenant=tenant,
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


T = TypeVar("T")


def run_steps(steps: Generator[None, None, T]) -> T:
    """Run stepwise work to its end, one step straight after the other."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)


class _Raced(Exception):
    """A job this batch meant to create was created by another intake meanwhile."""


def _internal_error() -> Rejection:
    return Rejection(
        code=RejectCode.INTERNAL_ERROR,
        message="the worker could not process this message",
        job_id=None,
        action=None,
    )


def _refused_properties(message: InboundMessage) -> Rejection | None:
    """A rejection for properties or headers the worker cannot use, naming which."""
    problem = properties.unusable(message.properties, message.headers)
    code = RejectCode.INVALID_PROPERTY
    if problem is None:
        problem = properties.reply_to_problem(message.reply_to)
        code = RejectCode.INVALID_REPLY_TO
    if problem is None:
        return None
    # The job id and action still name the job in the event, when the body has them.
    req = job_requests.parse_job_request(message.body, message.content_type)
    return Rejection(code, problem, req.job_id, req.action)


def _echo(message: InboundMessage) -> Echo:
    return Echo(
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
    )
