"""Intake's tenancy decisions, pure: who may adopt which batch request, and whose jobs a
message may name (worker/daemon/admission.py; docs/contract.md "Tenancy")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.daemon.admission import ACCEPTED, HELD, REJECTED, Decision, Tenancy, decide
from worker.daemon.admission import resolve_tenant as resolve
from worker.settings import TenantRule
from worker.store.jobs import IntakeView, JobRow
from worker.wire import job_requests
from worker.wire.job_requests import JobRequest, Rejection

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FLEET = "fleet-a"
OURS = "0b1c7a52-3c09-4d0e-8e2a-2f4b1c9d7e01"  # created by a job of the fleet
FOREIGN = "9f8e7d6c-5b4a-4392-8170-6e5d4c3b2a10"  # created elsewhere


@dataclass(frozen=True)
class Read:
    request: JobRequest | Rejection
    digest: str = ""
    row: JobRow | None = None
    tenant: str | None = None


def submit(job_id: str, tenant: str | None = None, adopt: str | None = None) -> Read:
    body: dict[str, object] = {"job_id": job_id}
    body.update({"batch_request_id": adopt} if adopt else {"request": {"v": 1}})
    if tenant is not None:
        body["tenant"] = tenant
    req = JobRequest.model_validate(body)
    digest = job_requests.request_hash(req)
    return Read(req, digest, JobRow(FLEET, job_id, digest, T0, {}), tenant)


def command(job_id: str, action: str, tenant: str | None = None) -> Read:
    body: dict[str, object] = {"job_id": job_id, "action": action}
    if tenant is not None:
        body["tenant"] = tenant
    return Read(JobRequest.model_validate(body), tenant=tenant)


def owned_by(tenant: str | None, read: Read | None = None) -> IntakeView:
    return IntakeView((read or submit("any")).digest, None, tenant)


def run(
    reads: Sequence[Read],
    known: Mapping[str, IntakeView] | None = None,
    *,
    origins: Mapping[str, frozenset[str]] | None = None,
    tenancy: Tenancy | None = None,
    max_in_flight: int = 100,
) -> list[Decision]:
    return decide(
        reads,
        active=0,
        known=known or {},
        max_in_flight=max_in_flight,
        fleet_id=FLEET,
        origins={OURS: frozenset({""})} if origins is None else origins,
        tenancy=tenancy,
    )


def code(decision: Decision) -> str | None:
    return None if decision.refusal is None else str(decision.refusal.code)


# -- without tenancy ---------------------------------------------------------------------


def test_adopting_a_request_the_fleet_did_not_create_is_refused_by_default() -> None:
    foreign, ours = run([submit("j1", adopt=FOREIGN), submit("j2", adopt=OURS)])
    assert foreign.outcome == REJECTED and code(foreign) == "ADOPTION_REFUSED"
    assert foreign.refusal is not None
    assert FOREIGN not in foreign.refusal.message  # the message names the field, no value
    assert ours.outcome == ACCEPTED and ours.insert is not None


def test_adopt_foreign_allows_it() -> None:
    (decision,) = run([submit("j1", adopt=FOREIGN)], tenancy=Tenancy(adopt_foreign=True))
    assert decision.outcome == ACCEPTED


def test_a_refused_adoption_is_refused_even_when_the_fleet_is_full() -> None:
    (decision,) = run([submit("j1", adopt=FOREIGN)], max_in_flight=0)
    assert code(decision) == "ADOPTION_REFUSED"  # not held: waiting would not change it


def test_start_cancel_and_resubmit_of_another_tenants_job_are_refused() -> None:
    job = submit("j1", "team-a")
    known = {"j1": owned_by("team-a", job)}
    for read in (command("j1", "cancel", "team-b"), command("j1", "start"), submit("j1")):
        (decision,) = run([read], known)
        assert decision.outcome == REJECTED and code(decision) == "NOT_JOB_OWNER"
    (own,) = run([command("j1", "cancel", "team-a")], known)
    assert own == Decision("cancel", ACCEPTED, request=("j1", "cancel"))
    (again,) = run([job], known)
    assert again.outcome == ACCEPTED  # its own idempotent re-submit


def test_a_job_the_batch_creates_is_owned_by_its_sender() -> None:
    _, theirs, mine = run(
        [
            submit("j1", "team-a"),
            command("j1", "cancel", "team-b"),
            command("j1", "cancel", "team-a"),
        ]
    )
    assert code(theirs) == "NOT_JOB_OWNER"
    assert mine.outcome == ACCEPTED


# -- with tenancy ------------------------------------------------------------------------

RULES = Tenancy(
    rules={
        "team-a": TenantRule(),
        "team-b": TenantRule(adopt="fleet"),
        "ops": TenantRule(adopt="any", manage="any"),
    }
)


def test_a_configured_fleet_admits_only_its_tenants() -> None:
    nobody, stranger, member = run(
        [submit("j1"), submit("j2", "mallory"), submit("j3", "team-a")], tenancy=RULES
    )
    assert code(nobody) == "TENANT_REQUIRED"
    assert code(stranger) == "UNKNOWN_TENANT"
    assert member.outcome == ACCEPTED


def test_each_tenant_adopts_what_its_rule_allows() -> None:
    origins = {OURS: frozenset({"team-b"})}  # created by a job of team-b
    decisions = run(
        [
            submit("a1", "team-a", adopt=OURS),  # own: not team-a's
            submit("b1", "team-b", adopt=OURS),  # its own
            submit("b2", "team-b", adopt=FOREIGN),  # fleet: not the fleet's
            submit("o1", "ops", adopt=FOREIGN),  # any
        ],
        origins=origins,
        tenancy=RULES,
    )
    assert [code(d) for d in decisions] == ["ADOPTION_REFUSED", None, "ADOPTION_REFUSED", None]
    # "fleet" takes a request any job of the fleet created, whoever's.
    (fleet,) = run(
        [submit("b3", "team-b", adopt=OURS)], origins={OURS: frozenset({"team-a"})}, tenancy=RULES
    )
    assert fleet.outcome == ACCEPTED


def test_an_operators_tenant_manages_every_job() -> None:
    (decision,) = run([command("j1", "cancel", "ops")], {"j1": owned_by("team-a")}, tenancy=RULES)
    assert decision == Decision("cancel", ACCEPTED, request=("j1", "cancel"))


# -- the tenant's source -----------------------------------------------------------------


def test_the_tenant_is_the_body_field_by_default_and_user_id_when_configured() -> None:
    req = JobRequest.model_validate({"job_id": "j1", "request": {}, "tenant": "team-a"})
    assert resolve(req, "someone-else", Tenancy()) == req
    by_user = Tenancy(source="user_id")
    bare = JobRequest.model_validate({"job_id": "j1", "request": {}})
    resolved = resolve(bare, "team-b", by_user)
    assert isinstance(resolved, JobRequest) and resolved.tenant == "team-b"
    mismatch = resolve(req, "team-b", by_user)
    assert isinstance(mismatch, Rejection) and mismatch.code == "TENANT_MISMATCH"
    assert resolve(req, "team-a", by_user) == req
    unusable = resolve(bare, "not a name!", by_user)
    assert isinstance(unusable, Rejection) and unusable.code == "INVALID_FIELD"
    assert resolve(bare, None, by_user) == bare  # no user_id: no tenant


# -- properties over generated batches ---------------------------------------------------

TENANTS = [None, "team-a", "team-b", "ops", "mallory"]
JOB_IDS = ["a", "b", "c"]
tenants_ = st.sampled_from(TENANTS)
reads_ = st.one_of(
    st.builds(submit, st.sampled_from(JOB_IDS), tenants_),
    st.builds(submit, st.sampled_from(JOB_IDS), tenants_, st.sampled_from([OURS, FOREIGN])),
    st.builds(command, st.sampled_from(JOB_IDS), st.sampled_from(["start", "cancel"]), tenants_),
)
knowns = st.dictionaries(st.sampled_from(JOB_IDS), st.builds(owned_by, tenants_))
origins_ = st.dictionaries(
    st.sampled_from([OURS, FOREIGN]),
    st.frozensets(st.sampled_from(["", "team-a", "team-b"]), min_size=1),
)
tenancies = st.sampled_from([Tenancy(), Tenancy(adopt_foreign=True), RULES])


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(reads_, max_size=8),
    known=knowns,
    origins=origins_,
    tenancy=tenancies,
    limit=st.integers(0, 4),
)
def test_no_message_reaches_a_job_or_request_its_sender_may_not(
    batch: list[Read],
    known: dict[str, IntakeView],
    origins: dict[str, frozenset[str]],
    tenancy: Tenancy,
    limit: int,
) -> None:
    decisions = run(batch, known, origins=origins, tenancy=tenancy, max_in_flight=limit)
    owners = {job_id: view.tenant for job_id, view in known.items()}
    for read, decision in zip(batch, decisions, strict=True):
        req = read.request
        assert isinstance(req, JobRequest)
        sender, rule = read.tenant, tenancy.rule(read.tenant)
        if rule is None:
            # Configured tenancy: an unknown or missing tenant gets nowhere.
            assert tenancy.configured
            assert code(decision) in ("TENANT_REQUIRED", "UNKNOWN_TENANT")
            continue
        if decision.outcome == REJECTED:
            assert code(decision) in (
                "NOT_JOB_OWNER", "ADOPTION_REFUSED", "JOB_NOT_FOUND", "JOB_CONFLICT"
            )  # fmt: skip
            continue
        if req.job_id in owners and decision.outcome == ACCEPTED:
            # Anything reaching an existing job comes from its owner, or an operator.
            assert owners[req.job_id] == sender or rule.manage == "any"
        if decision.insert is not None:
            adopt = req.batch_request_id
            if adopt is not None and rule.adopt != "any":
                creators = origins.get(adopt)
                assert creators is not None  # created by a job of the fleet
                if rule.adopt == "own":
                    assert (sender or "") in creators
            owners[req.job_id] = sender
        if decision.outcome == HELD:
            assert req.job_id not in owners
