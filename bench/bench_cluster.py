"""A node of a three-node RabbitMQ cluster lost in the middle of a run: what it costs.

Forms a cluster of this machine's RabbitMQ on ports of its own (tests/rabbit_cluster.py:
nodes rabbit-c1..c3@localhost, AMQP 5791-5793, their own epmd; the shared broker on 5672 is
not touched), starts two worker processes (``batch-worker run``) with the whole cluster as
BATCH_WORKER_BROKER_URL (a ;-separated failover list), publishes job requests at a steady
rate through a node that stays up, SIGKILLs the node leading the jobs queue half-way, and
waits for every confirmed job to end. PostgreSQL is the shared one (a scratch database,
dropped after); the simulator and an S3 emulator (moto) run in this process.

    PYTHONPATH=. python bench/bench_cluster.py [--jobs 300] [--rate 10] [--speed 200]

Prints the figures (time to fail over, jobs, events, duplicates) and exits 1 when a check
fails: a confirmed job without exactly one terminal event, a dead letter, a rejection, a
message or an outbox row left behind. docs/deployment.md "RabbitMQ cluster" has the results.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
import psycopg
from moto.server import ThreadedMotoServer

from tests.e2e.conftest import FAST, free_port
from tests.rabbit_cluster import FailoverReport, rabbit_cluster, rabbitmq_missing, run_failover
from worker.simulator import SimulatorConfig, start_background

PG_URL = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def problems(report: FailoverReport) -> list[str]:
    """The run's broken promises (docs/contract.md "Events"), one line each."""
    found = []
    if report.without_terminal:
        found.append(f"{len(report.without_terminal)} confirmed jobs never ended")
    if report.with_two_terminals:
        found.append(f"{len(report.with_two_terminals)} jobs with two terminal events")
    if report.accepted != report.jobs:
        found.append(f"{report.jobs - report.accepted} confirmed jobs never accepted")
    for name, value in (
        ("rejected", report.rejected),
        ("dead-lettered", report.dead_lettered),
        ("left in the jobs queue", report.left_in_jobs_queue),
        ("left in the outbox", report.left_in_outbox),
    ):
        if value:
            found.append(f"{value} {name}")
    if not any(report.connections_lost.values()):
        found.append("no worker lost a connection: the kill did not reach them")
    return found


def print_report(report: FailoverReport) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    print()
    how = "froze (SIGSTOP)" if report.frozen else "killed (SIGKILL)"
    print(f"{how} {report.killed} after {report.killed_after_jobs} of {report.jobs} jobs")
    print(
        f"  new leader of the jobs queue  {report.new_leader} (seen {seconds(report.election_s)})"
    )
    for name, value in sorted(report.reconnect_s.items()):
        print(f"  {name:<29} reconnected {seconds(value)} after the kill")
    print(f"  longest pause between accepts {seconds(report.accept_gap_s)}")
    print(f"  connections lost              {report.connections_lost}")
    print(f"  connected at the end          {report.connected_to}")
    print(
        f"jobs       {report.jobs} confirmed, {report.publish_retries} publishes retried, "
        f"longest confirm wait {report.confirm_wait_s:.1f} s"
    )
    print(f"accepted   {report.accepted} jobs, {report.accepted_twice} accepted again")
    print(f"terminal   {report.terminal}, {report.lost} jobs without one {report.unfinished}")
    duplicates = report.deliveries - report.distinct_events
    print(
        f"events     {report.deliveries} delivered, {report.distinct_events} distinct, "
        f"{duplicates} duplicate deliveries"
    )
    print(
        f"left       {report.dead_lettered} dead-lettered, {report.left_in_jobs_queue} in the "
        f"jobs queue, {report.left_in_outbox} in the outbox; {report.rejected} rejected"
    )
    print(f"wall       {report.wall_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0, help="job requests a second")
    parser.add_argument("--speed", type=float, default=FAST["speed"], help="simulator speed")
    parser.add_argument(
        "--settle", type=float, default=300.0, help="how long to wait for the jobs to end (s)"
    )
    parser.add_argument("--kill-after", type=float, default=0.5, help="share of jobs out")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="SIGSTOP the leader instead of SIGKILL: a hung or unreachable machine",
    )
    parser.add_argument(
        "--net-ticktime", type=int, help="the nodes' net_ticktime (s; RabbitMQ's default 60)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the cluster's folder")
    args = parser.parse_args()
    missing = rabbitmq_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="bw-cluster-"))
    database = f"bw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    database_url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{database}"))
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="eu-central-1",
    )
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
    )
    try:
        say(f"forming a 3-node cluster under {root}")
        formed = time.monotonic()
        with rabbit_cluster(root, net_ticktime=args.net_ticktime) as cluster:
            say(f"cluster formed in {time.monotonic() - formed:.0f} s: {cluster.url_list()}")
            with start_background(SimulatorConfig(**{**FAST, "speed": args.speed})) as sim:
                report = run_failover(
                    cluster,
                    database_url=database_url,
                    simulator=sim,
                    bucket=bucket,
                    tmp=root,
                    jobs=args.jobs,
                    rate=args.rate,
                    kill_after=args.kill_after,
                    freeze=args.freeze,
                    settle_timeout=args.settle,
                    say=say,
                )
    finally:
        s3.stop()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print_report(report)
    found = problems(report)
    for problem in found:
        print(f"FAILED: {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
