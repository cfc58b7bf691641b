"""What intake does with each message of a batch: decided here, pure.

Input: the batch as read (each message's request, or why it could not be read; a submit's
request hash and, should its job be new, its row), what intake's lookup found (the fleet's
active job count and those of the named jobs that exist: their request hash, their latest
status event), and ``MAX_IN_FLIGHT``. Output: one ``Decision`` per message, in order.

Messages are decided in delivery order, each against what the ones before it did: a second
submit of a job the batch creates is a re-submit of it (or a conflict), a cancel finds it.

- unreadable: rejected, with its reason;
- submit of a new job: inserted, or held (deferred, never rejected) while the fleet has
  ``MAX_IN_FLIGHT`` active jobs; the room left counts the jobs this batch creates;
- submit of an existing job: the same request is an idempotent re-submit, accepted with the
  job's latest status published again; another request is refused (``JOB_CONFLICT``);
- start / cancel: requested on an existing job (never held), or refused (``JOB_NOT_FOUND``).

worker/daemon/intake.py performs the decisions: inserts, requests and events (an accepted
message's ``command.accepted``, a rejected one's ``command.rejected`` and dead letter) in one
transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from worker.wire import job_requests
from worker.wire.job_requests import JobRequest, RejectCode, Rejection

if TYPE_CHECKING:
    from worker.store.jobs import IntakeView, JobRow
    from worker.wire.outgoing import OutboxMessage

# A decision's outcome; the first two are also the command metric's outcome label.
ACCEPTED, REJECTED, HELD = "accepted", "rejected", "held"


class Read(Protocol):
    """One message as intake read it, ahead of its transaction."""

    @property
    def request(self) -> JobRequest | Rejection: ...

    @property
    def digest(self) -> str: ...  # a submit's ``job_requests.request_hash``

    @property
    def row(self) -> JobRow | None: ...  # a submit's job row, should the job be new


class Decision(NamedTuple):
    """What intake does with one message."""

    action: str  # the request's action ("" when it could not be read)
    outcome: str  # ACCEPTED, REJECTED or HELD (offered again later, nothing written)
    insert: JobRow | None = None  # accepted, a new job: its row
    request: tuple[str, str] | None = None  # accepted start / cancel: (job id, action)
    refusal: Rejection | None = None  # rejected: why
    republish: OutboxMessage | None = None  # accepted re-submit: the job's latest status


_HELD = Decision("submit", HELD)


def decide(
    reads: Sequence[Read],
    *,
    active: int,
    known: Mapping[str, IntakeView],
    max_in_flight: int,
    fleet_id: str,
) -> list[Decision]:
    """The decision for each of ``reads``, in order, given the fleet's ``active`` job count
    and the ``known`` jobs (by job id) among those the batch names."""
    room = max_in_flight - active
    created: dict[str, str] = {}  # the jobs this batch creates: job id -> request hash
    decisions: list[Decision] = []
    append = decisions.append
    for read in reads:
        req = read.request
        if isinstance(req, Rejection):
            append(Decision(req.action or "", REJECTED, refusal=req))
            continue
        job_id, action = req.job_id, req.action
        view = known.get(job_id)
        stored = view.request_hash if view is not None else created.get(job_id)
        if action != "submit":
            if stored is None:
                message = f"no job {job_id!r} in fleet {fleet_id!r}"
                refusal = Rejection(RejectCode.JOB_NOT_FOUND, message, job_id, action)
                append(Decision(action, REJECTED, refusal=refusal))
            else:
                append(Decision(action, ACCEPTED, request=(job_id, action)))
        elif stored is None:
            if room <= 0:
                append(_HELD)
                continue
            assert read.row is not None  # every submit read has its row
            created[job_id] = read.digest
            room -= 1
            append(Decision(action, ACCEPTED, insert=read.row))
        elif job_requests.same_request(stored, req, read.digest):
            last = view.last_status_event if view is not None else None
            append(Decision(action, ACCEPTED, republish=last))
        else:
            message = f"job {job_id!r} exists with a different request"
            refusal = Rejection(RejectCode.JOB_CONFLICT, message, job_id, action)
            append(Decision(action, REJECTED, refusal=refusal))
    return decisions
