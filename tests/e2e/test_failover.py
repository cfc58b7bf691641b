"""A three-node RabbitMQ cluster loses the node leading the jobs queue in the middle of a
run (tests/rabbit_cluster.py; the figures of a longer run: bench/bench_cluster.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.rabbit_cluster import rabbit_cluster, rabbitmq_missing, run_failover

JOBS = 40


# Serial: three more RabbitMQ nodes and two workers would starve the parallel tests of the
# machine's two cores. The shared broker is not touched.
@pytest.mark.serial
@pytest.mark.integration
@pytest.mark.slow
def test_losing_the_node_leading_the_jobs_queue_loses_no_job(
    database_url: str, simulator: Any, s3_bucket: str, tmp_path: Path
) -> None:
    missing = rabbitmq_missing()
    if missing:
        if IN_CI:
            pytest.fail(missing)
        pytest.skip(missing)
    with rabbit_cluster(tmp_path / "cluster") as cluster:
        report = run_failover(
            cluster,
            database_url=database_url,
            simulator=simulator,
            bucket=s3_bucket,
            tmp=tmp_path,
            jobs=JOBS,
            rate=8,
            settle_timeout=240,  # a loaded machine; a passing run waits only as long as its jobs
        )
        survivors = {node.short for node in cluster.alive()}

    # Both workers were on the leader's node (the first of their list) and moved on.
    assert report.new_leader not in (None, report.killed)
    assert report.connections_lost == {"w0": 2, "w1": 2}  # each its consumer and its relay
    for worker in ("w0", "w1"):
        places = sorted(report.connected_to[worker])
        assert [place.split("@")[0] for place in places] == ["consume", "publish"], places
        assert {place.split("@")[1] for place in places} <= survivors, places

    # Nothing confirmed to the producer was lost, nothing ended twice, nothing dead-lettered.
    assert report.jobs == JOBS
    assert report.accepted == JOBS
    assert report.without_terminal == []
    assert report.with_two_terminals == []
    assert report.terminal == {"DONE": JOBS}
    assert report.rejected == 0
    assert report.dead_lettered == 0
    assert report.left_in_jobs_queue == 0
    assert report.left_in_outbox == 0
