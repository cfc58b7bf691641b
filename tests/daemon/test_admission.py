"""Intake's decisions, pure: no database, the lookup's answer given as data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.daemon.admission import ACCEPTED, HELD, REJECTED, Decision, decide
from worker.store.jobs import IntakeView, JobRow
from worker.wire import job_requests
from worker.wire.job_requests import JobRequest, Rejection
from worker.wire.outgoing import OutboxMessage

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FLEET = "fleet-a"
STATUS = OutboxMessage(exchange="ev", routing_key="job.created", body=b'{"id": "e1"}')
UNREADABLE = Rejection("MALFORMED_JSON", "not JSON", None, None)


@dataclass(frozen=True)
class Read:
    request: JobRequest | Rejection
    digest: str = ""
    row: JobRow | None = None
    tenant: str | None = None


def submit(job_id: str, variant: str = "x") -> Read:
    req = JobRequest.model_validate({"job_id": job_id, "request": {"variant": variant}})
    digest = job_requests.request_hash(req)
    return Read(req, digest, JobRow(FLEET, job_id, digest, T0, {}))


def command(job_id: str, action: str) -> Read:
    return Read(JobRequest.model_validate({"job_id": job_id, "action": action}))


def stored(variant: str = "x", status: OutboxMessage | None = None) -> IntakeView:
    return IntakeView(submit("any", variant).digest, status)


def run(
    reads: Sequence[Read],
    known: dict[str, IntakeView] | None = None,
    *,
    active: int = 0,
    max_in_flight: int = 100,
) -> list[Decision]:
    return decide(
        reads, active=active, known=known or {}, max_in_flight=max_in_flight, fleet_id=FLEET
    )


def test_a_new_job_is_inserted_with_the_row_it_was_read_with() -> None:
    read = submit("j1")
    assert run([read]) == [Decision("submit", ACCEPTED, insert=read.row)]


def test_a_new_job_past_max_in_flight_is_held_and_nothing_else_is() -> None:
    reads = [submit("new"), submit("old"), command("old", "cancel"), command("old", "start")]
    decisions = run(reads, {"old": stored()}, active=3, max_in_flight=3)
    assert [d.outcome for d in decisions] == [HELD, ACCEPTED, ACCEPTED, ACCEPTED]
    assert decisions[0] == Decision("submit", HELD)
    assert [d.request for d in decisions[2:]] == [("old", "cancel"), ("old", "start")]


def test_the_room_left_counts_the_jobs_the_batch_creates() -> None:
    reads = [submit("a"), submit("b"), submit("a"), submit("c")]
    decisions = run(reads, active=1, max_in_flight=3)
    assert [d.outcome for d in decisions] == [ACCEPTED, ACCEPTED, ACCEPTED, HELD]
    # The second submit of a is a re-submit of the job the batch creates: no second row,
    # and no status to publish again yet.
    assert [d.insert for d in decisions[:3]] == [reads[0].row, reads[1].row, None]
    assert decisions[2].republish is None


def test_an_idempotent_resubmit_publishes_the_latest_status_again() -> None:
    (decision,) = run([submit("j1")], {"j1": stored(status=STATUS)})
    assert decision == Decision("submit", ACCEPTED, republish=STATUS)
    (silent,) = run([submit("j1")], {"j1": stored(status=None)})
    assert silent == Decision("submit", ACCEPTED)


def test_a_resubmit_of_another_request_conflicts() -> None:
    (known,) = run([submit("j1", "y")], {"j1": stored("x")})
    conflict = Rejection("JOB_CONFLICT", "job 'j1' exists with a different request", "j1", "submit")
    assert known == Decision("submit", REJECTED, refusal=conflict)
    # The same against a job the batch itself creates.
    _, again = run([submit("j2", "x"), submit("j2", "y")])
    assert again.outcome == REJECTED and again.refusal is not None
    assert again.refusal.code == "JOB_CONFLICT"


def test_a_resubmit_of_a_job_stored_with_a_version_1_hash_is_recognised() -> None:
    read = submit("j1")
    assert isinstance(read.request, JobRequest)
    v1 = IntakeView(job_requests.request_hash_v1(read.request), STATUS)
    assert run([read], {"j1": v1}) == [Decision("submit", ACCEPTED, republish=STATUS)]
    assert run([submit("j1", "y")], {"j1": v1})[0].outcome == REJECTED


@pytest.mark.parametrize("action", ["start", "cancel"])
def test_start_and_cancel_need_the_job(action: str) -> None:
    ghost, known = run([command("ghost", action), command("j1", action)], {"j1": stored()})
    not_found = Rejection("JOB_NOT_FOUND", "no job 'ghost' in fleet 'fleet-a'", "ghost", action)
    assert ghost == Decision(action, REJECTED, refusal=not_found)
    assert known == Decision(action, ACCEPTED, request=("j1", action))


def test_a_cancel_finds_a_job_created_before_it_in_the_batch_and_not_after() -> None:
    before, created, after = run([command("j7", "cancel"), submit("j7"), command("j7", "cancel")])
    assert before.outcome == REJECTED
    assert created.insert is not None
    assert after == Decision("cancel", ACCEPTED, request=("j7", "cancel"))


def test_an_unreadable_message_is_rejected_with_its_reason() -> None:
    named = Rejection("INVALID_FIELD", "field 'deadline'", "j1", "submit")
    assert run([Read(UNREADABLE), Read(named)]) == [
        Decision("", REJECTED, refusal=UNREADABLE),
        Decision("submit", REJECTED, refusal=named),
    ]


def test_the_lookup_answer_is_left_as_it_was() -> None:
    known = {"j1": stored()}
    run([submit("j2"), command("j2", "cancel")], known)
    assert known == {"j1": stored()}


# -- properties over generated batches ---------------------------------------------------

JOB_IDS = ["a", "b", "c"]
reads_ = st.one_of(
    st.builds(submit, st.sampled_from(JOB_IDS), st.sampled_from(["x", "y"])),
    st.builds(command, st.sampled_from(JOB_IDS), st.sampled_from(["start", "cancel"])),
    st.just(Read(UNREADABLE)),
)
knowns = st.dictionaries(
    st.sampled_from(JOB_IDS),
    st.builds(stored, st.sampled_from(["x", "y"]), st.sampled_from([None, STATUS])),
)
batches = st.lists(reads_, max_size=8)


@settings(max_examples=200, deadline=None)
@given(batch=batches, known=knowns, active=st.integers(0, 4), limit=st.integers(0, 4))
def test_a_batch_is_decided_as_its_messages_would_be_one_after_the_other(
    batch: list[Read], known: dict[str, IntakeView], active: int, limit: int
) -> None:
    whole = run(batch, known, active=active, max_in_flight=limit)
    state, count, alone = dict(known), active, []
    for read in batch:
        (decision,) = run([read], state, active=count, max_in_flight=limit)
        alone.append(decision)
        if decision.insert is not None:
            state[decision.insert.job_id] = IntakeView(read.digest, None)
            count += 1
    assert whole == alone


@settings(max_examples=200, deadline=None)
@given(batch=batches, known=knowns, active=st.integers(0, 4), limit=st.integers(0, 4))
def test_what_each_message_may_become(
    batch: list[Read], known: dict[str, IntakeView], active: int, limit: int
) -> None:
    decisions = run(batch, known, active=active, max_in_flight=limit)
    assert len(decisions) == len(batch)
    inserted = [d.insert.job_id for d in decisions if d.insert is not None]
    assert len(inserted) <= max(0, limit - active)
    assert len(set(inserted)) == len(inserted)  # a job is created once
    assert not set(inserted) & set(known)  # and never over one that exists
    held_yet, created = False, {}  # created: job id -> its request hash
    for read, decision in zip(batch, decisions, strict=True):
        req = read.request
        if isinstance(req, Rejection):
            assert decision == Decision(req.action or "", REJECTED, refusal=req)
            continue
        exists = req.job_id in known or req.job_id in created  # before this message
        assert decision.action == req.action
        assert (decision.outcome == REJECTED) == (decision.refusal is not None)
        if req.action != "submit":
            # A command is never held: it finds its job, or is refused for its absence.
            assert decision.outcome == (ACCEPTED if exists else REJECTED)
            assert decision.request == ((req.job_id, req.action) if exists else None)
            assert decision.refusal is None or decision.refusal.code == "JOB_NOT_FOUND"
        elif not exists:
            # A new job goes in, or waits; after one has waited, every new one does.
            assert decision.outcome in (ACCEPTED, HELD)
            assert (decision.insert is read.row) == (decision.outcome == ACCEPTED)
            assert not (held_yet and decision.outcome == ACCEPTED)
            held_yet = held_yet or decision.outcome == HELD
        else:
            # An existing job: an idempotent re-submit or a conflict, never a second row.
            assert decision.insert is None and decision.outcome != HELD
            assert decision.refusal is None or decision.refusal.code == "JOB_CONFLICT"
            view = known.get(req.job_id)
            same = (view.request_hash if view else created[req.job_id]) == read.digest
            assert decision.outcome == (ACCEPTED if same else REJECTED)
            last = view.last_status_event if view else None
            assert decision.republish is (last if decision.outcome == ACCEPTED else None)
        if decision.insert is not None:
            created[req.job_id] = read.digest
