"""The status API's queries (worker/store/listing.py) against the real PostgreSQL."""

from __future__ import annotations

import pytest
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, LEASE, T0, insert, job
from worker.lifecycle.state import PastRequest, Retry
from worker.store import leases, listing

pytestmark = pytest.mark.integration


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
