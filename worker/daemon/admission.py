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
- start / cancel: requested on an existing job (never held), or refused (``JOB_NOT_FOUND``);
- tenancy (docs/contract.md "Tenancy"), checked before all of the above but unreadability:
  with ``TENANTS`` set, a message names a configured tenant (``TENANT_REQUIRED``,
  ``UNKNOWN_TENANT``); a message for an existing job comes from its tenant, unless the
  sender's rule manages any (``NOT_JOB_OWNER``); a submit adopting a batch request needs a
  request some job of the fleet created (of the sender's own, under ``adopt: own``),
  unless ``ADOPT_FOREIGN`` (without tenancy) or ``adopt: any`` says otherwise
  (``ADOPTION_REFUSED``). A job's tenant is the one its submit named, none included.

worker/daemon/intake.py performs the decisions: inserts, requests and events (an accepted
message's ``command.accepted``, a rejected one's ``command.rejected`` and dead letter) in one
transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from worker.settings import Settings, TenantRule
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

    @property
    def tenant(self) -> str | None: ...  # the sender's tenant (``resolve_tenant``)


# What a tenant may do when no TENANTS are configured: only its own jobs (a message with no
# tenant owns jobs with none), and adopt only what the fleet created unless ADOPT_FOREIGN.
_UNCONFIGURED = TenantRule(adopt="fleet", manage="own")
_UNCONFIGURED_FOREIGN = TenantRule(adopt="any", manage="own")


@dataclass(frozen=True)
class Tenancy:
    """The tenancy settings, as admission reads them."""

    rules: Mapping[str, TenantRule] = field(default_factory=dict)
    adopt_foreign: bool = False
    source: str = "message"  # TENANT_SOURCE: "message" or "user_id"

    @classmethod
    def of(cls, settings: Settings) -> Tenancy:
        return cls(settings.tenants, settings.adopt_foreign, settings.tenant_source)

    @property
    def configured(self) -> bool:
        return bool(self.rules)

    def rule(self, tenant: str | None) -> TenantRule | None:
        """The sender's rule; None: the sender is not admitted (unknown, or none given)."""
        if not self.rules:
            return _UNCONFIGURED_FOREIGN if self.adopt_foreign else _UNCONFIGURED
        return self.rules.get(tenant) if tenant is not None else None


def resolve_tenant(
    req: JobRequest, user_id: str | None, tenancy: Tenancy
) -> JobRequest | Rejection:
    """The request with its sender's tenant in ``tenant``: the body's own, or with
    ``TENANT_SOURCE=user_id`` the AMQP ``user_id`` (which RabbitMQ checks against the
    publishing connection's user), a body naming another tenant refused."""
    if tenancy.source != "user_id":
        return req
    if req.tenant is not None and req.tenant != user_id:
        message = "field 'tenant' differs from the message's user_id property"
        return Rejection(RejectCode.TENANT_MISMATCH, message, req.job_id, req.action)
    if user_id is None or user_id == req.tenant:
        return req
    try:
        return req.model_copy(update={"tenant": job_requests.valid_tenant(user_id)})
    except ValueError:
        message = "the user_id property is not a valid tenant name"
        return Rejection(RejectCode.INVALID_FIELD, message, req.job_id, req.action)


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
    origins: Mapping[str, frozenset[str]] | None = None,
    tenancy: Tenancy | None = None,
) -> list[Decision]:
    """The decision for each of ``reads``, in order, given the fleet's ``active`` job count,
    the ``known`` jobs (by job id) among those the batch names, and the ``origins`` of the
    batch requests its submits adopt (those jobs of the fleet created: id -> the creators'
    tenants, "" for none)."""
    tenancy = tenancy or Tenancy()
    origins = origins or {}
    room = max_in_flight - active
    # the jobs this batch creates: job id -> (request hash, tenant)
    created: dict[str, tuple[str, str | None]] = {}
    decisions: list[Decision] = []
    append = decisions.append
    for read in reads:
        req = read.request
        if isinstance(req, Rejection):
            append(Decision(req.action or "", REJECTED, refusal=req))
            continue
        job_id, action, tenant = req.job_id, req.action, read.tenant
        rule = tenancy.rule(tenant)
        if rule is None:
            append(Decision(action, REJECTED, refusal=_not_admitted(req, tenant)))
            continue
        view = known.get(job_id)
        if view is not None:
            stored: str | None = view.request_hash
            owner = view.tenant
        else:
            stored, owner = created.get(job_id, (None, None))
        if stored is not None and owner != tenant and rule.manage != "any":
            message = f"job {job_id!r} belongs to another tenant"
            refusal = Rejection(RejectCode.NOT_JOB_OWNER, message, job_id, action)
            append(Decision(action, REJECTED, refusal=refusal))
            continue
        if action != "submit":
            if stored is None:
                message = f"no job {job_id!r} in fleet {fleet_id!r}"
                refusal = Rejection(RejectCode.JOB_NOT_FOUND, message, job_id, action)
                append(Decision(action, REJECTED, refusal=refusal))
            else:
                append(Decision(action, ACCEPTED, request=(job_id, action)))
        elif stored is None:
            adopt = req.batch_request_id
            if adopt is not None and not _may_adopt(rule, tenant, origins.get(adopt)):
                append(Decision(action, REJECTED, refusal=_adoption_refused(req, rule)))
                continue
            if room <= 0:
                append(_HELD)
                continue
            assert read.row is not None  # every submit read has its row
            created[job_id] = (read.digest, tenant)
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


def _may_adopt(rule: TenantRule, tenant: str | None, creators: frozenset[str] | None) -> bool:
    if rule.adopt == "any":
        return True
    if creators is None:  # no job of the fleet created it
        return False
    return rule.adopt == "fleet" or (tenant or "") in creators


def _adoption_refused(req: JobRequest, rule: TenantRule) -> Rejection:
    whose = "this tenant's jobs" if rule.adopt == "own" else "jobs of this fleet"
    message = f"field 'batch_request_id': the batch request was not created by {whose}"
    return Rejection(RejectCode.ADOPTION_REFUSED, message, req.job_id, req.action)


def _not_admitted(req: JobRequest, tenant: str | None) -> Rejection:
    if tenant is None:
        message = "field 'tenant': required (tenancy is configured)"
        return Rejection(RejectCode.TENANT_REQUIRED, message, req.job_id, req.action)
    message = "field 'tenant': not a tenant of this fleet"
    return Rejection(RejectCode.UNKNOWN_TENANT, message, req.job_id, req.action)
