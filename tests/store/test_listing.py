"""The status API's and ``batch-worker jobs``'s queries (worker/store/listing.py): the job
filter both parse a query into (one parser, every refusal naming its field), and the
queries against the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, LEASE, T0, insert, job
from worker.lifecycle.state import PastRequest, Retry
from worker.store import leases, listing
from worker.store.listing import MAX_PAGE, BadFilter, JobFilter, instant


def test_no_query_is_every_job_of_the_fleet_first_page() -> None:
    assert JobFilter.from_query([], fleet_id="f") == JobFilter(fleet_id="f")


def test_every_field_is_read() -> None:
    spec = JobFilter.from_query(
        [
            ("status", "running, failed"),
            ("status", "pending_create"),
            ("status", " ,"),
            ("q", "abc"),
            ("since", "2026-01-02T03:04:05Z"),
            ("until", "2026-01-03T00:00:00+02:00"),
            ("active", "false"),
            ("limit", str(MAX_PAGE)),
            ("offset", "0"),
            ("order", "duration"),
            ("fleet", "ignored: the caller's to choose"),
        ],
        fleet_id="f",
    )
    assert spec == JobFilter(
        fleet_id="f",
        statuses=("RUNNING", "FAILED", "PENDING_CREATE"),
        text="abc",
        since=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        until=datetime(2026, 1, 3, tzinfo=timezone(timedelta(hours=2))),
        active=False,
        limit=MAX_PAGE,
        offset=0,
        order="duration",
    )
    assert JobFilter.from_query([("active", "true"), ("q", "")], fleet_id="f") == JobFilter(
        fleet_id="f", active=True
    )
    # A name given twice: its first value counts (as aiohttp's query.get has it).
    assert JobFilter.from_query([("limit", "3"), ("limit", "4")], fleet_id="f").limit == 3


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (("since", "yesterday"), "since: not an ISO 8601 time"),
        (("until", "2026-01-02T03:04:05"), "until: give a time zone (Z or +hh:mm)"),
        (("active", "yes"), "active: true or false"),
        (("order", "name"), "order: accepted or duration"),
        (("limit", "ten"), "limit: not an integer"),
        (("limit", "0"), f"limit: must be from 1 to {MAX_PAGE}"),
        (("limit", str(MAX_PAGE + 1)), f"limit: must be from 1 to {MAX_PAGE}"),
        (("offset", "-1"), "offset: must be from 0 to 10000000"),
    ],
)
def test_a_value_it_does_not_take_is_refused_by_name(query: tuple[str, str], message: str) -> None:
    with pytest.raises(BadFilter) as refused:
        JobFilter.from_query([query], fleet_id="f")
    assert str(refused.value) == message


def test_an_instant_needs_its_zone() -> None:
    assert instant("2026-01-02T03:04:05+00:00") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(ValueError, match="give a time zone"):
        instant("2026-01-02")


def test_a_page_says_where_the_next_one_starts() -> None:
    spec = JobFilter(fleet_id="f", limit=2, offset=4)
    jobs = [{"job_id": "a"}, {"job_id": "b"}]
    assert spec.page(jobs, 7) == {
        "fleet_id": "f",
        "jobs": jobs,
        "total": 7,
        "limit": 2,
        "offset": 4,
        "next_offset": 6,
    }
    assert spec.page(jobs, 6)["next_offset"] is None
    assert spec.page([], 3)["next_offset"] is None


@pytest.mark.integration
def test_a_job_with_a_follow_up_lists_and_sums_the_cost_of_all_its_requests(
    pool: ConnectionPool,
) -> None:
    insert(pool, job("retried"))
    insert(pool, job("single"))
    first = PastRequest(batch_request_id="b0", attempt=0, status="DONE", cost_pu=60.0)
    with pool.connection() as conn:
        for c in leases.claim_due(conn, FLEET, "w1", now=T0, lease=LEASE, limit=10):
            changes: dict[str, object] = {
                "cost_pu": 30.0,
                "status": "PROCESSING",
                "batch_request_id": f"{c.state.job_id}-now",
            }
            if c.state.job_id == "retried":
                changes["retry"] = Retry(attempts=1, attempt=1, past=(first,), covering=3)
            state = c.state.model_copy(update=changes)
            leases.save_step(conn, state, generation=c.generation, owner="w1")
        found, total = listing.list_jobs(conn, listing.JobFilter(fleet_id=FLEET))
        overview = listing.fleet_overview(conn, FLEET)
    assert total == 2
    assert {j["job_id"]: j["cost_pu"] for j in found} == {"retried": 90.0, "single": 30.0}
    assert overview["cost_pu"] == 120.0
    assert overview["by_status"]["PROCESSING"]["cost_pu"] == 120.0
