"""A burst of submits: how fast does intake absorb them, next to how fast one client publishes?

Target (issue 4): a burst of 10,000 submits absorbed at >= 25 % of the rate at which one
client publishes them with confirms pipelined to the same broker.

Side by side in one run, on the same broker and the same bodies (the GeoTIFF example, ~1.5 KB):
1. baseline: one py-amqp client publishes N messages to a quorum queue, every confirm
   outstanding until the end (pipelined), and waits for all of them (the median of three
   such publishes);
2. intake: the same N submits wait in the jobs queue; the worker's consumer and intake take
   them in (one transaction per batch, acked after commit) until N jobs are in PostgreSQL;
3. relay: the `command.accepted` events of those N jobs are published with confirms.

    PYTHONPATH=. python bench/bench_intake.py --jobs 10000 [--repeat 3] [--processes 2]

With ``--repeat``, every run is printed and the figures of the run with the median ratio
close the report (each run's intake is set beside its own baseline, never another run's).

Needs RabbitMQ and PostgreSQL (BATCH_WORKER_TEST_BROKER_URL, BATCH_WORKER_TEST_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import amqp
import psycopg

from worker.broker import connection, declare_topology
from worker.daemon.consumer import JobsConsumer
from worker.daemon.intake import Intake
from worker.daemon.relay import Relay
from worker.daemon.supervisor import tune_gc
from worker.settings import Settings
from worker.store import capacity, db, jobs, outbox

BROKER_URL = os.environ.get("BATCH_WORKER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
PG_URL = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
EXAMPLE = Path(__file__).resolve().parent.parent / "worker" / "examples" / "max-ndvi-geotiff.json"


def bodies(n: int) -> list[bytes]:
    job = json.loads(EXAMPLE.read_text())
    out = []
    for i in range(n):
        job["job_id"] = f"burst-{i:06d}"
        out.append(json.dumps(job).encode())
    return out


def amqp_connection() -> amqp.Connection:
    parts = urlsplit(BROKER_URL)
    vhost = parts.path[1:] or "/"
    conn = amqp.Connection(
        host=f"{parts.hostname}:{parts.port or 5672}",
        userid=parts.username or "guest",
        password=parts.password or "guest",
        virtual_host="/" if vhost == "/" else vhost,
    )
    conn.connect()
    return conn


def publish_pipelined(queue: str, payloads: list[bytes]) -> float:
    """Publish every payload with confirms outstanding; return seconds until all confirmed."""
    conn = amqp_connection()
    channel = conn.channel()
    channel.confirm_select()
    acked = 0

    def on_ack(delivery_tag: int, multiple: bool) -> None:
        nonlocal acked
        acked = delivery_tag if multiple else acked + 1

    channel.events["basic_ack"].add(on_ack)
    start = time.perf_counter()
    for body in payloads:
        channel.basic_publish(
            amqp.Message(body, content_type="application/json", delivery_mode=2),
            exchange="",
            routing_key=queue,
        )
    while acked < len(payloads):
        conn.drain_events(timeout=30)
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


@dataclass(frozen=True)
class Run:
    publish: float  # messages a second, one client, confirms pipelined
    intake: float  # jobs a second taken into PostgreSQL
    relay: float  # accepted events a second published
    cpu_per_job: float | None  # µs of this process's CPU per job taken in (in-process intake)

    @property
    def ratio(self) -> float:
        return self.intake / self.publish


def _worker_process(fields: dict[str, Any], count: int, ready: Any, go: Any, stop: Any) -> None:
    """A worker process of the fleet design: its own pool, intake and consumer thread(s)."""
    tune_gc()  # as the daemon does
    settings = Settings(**fields)
    pool = db.open_pool(settings, min_size=1, max_size=2)
    intake = Intake(settings, pool)
    consumers = [JobsConsumer(settings, intake) for _ in range(count)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in consumers]
    ready.release()
    go.wait()
    for thread in threads:
        thread.start()
    stop.wait()
    for consumer, thread in zip(consumers, threads, strict=True):
        consumer.request_stop()
        thread.join(30)
    pool.close()


def absorb(
    settings: Settings, fields: dict[str, Any], pool: db.Pool, n: int, *, count: int, processes: int
) -> tuple[float, float | None]:
    """Seconds until ``n`` jobs are in PostgreSQL: ``count`` consumer threads in this
    process, or in each of ``processes`` worker processes (started, and ready, beforehand);
    with intake in this process, also its CPU seconds meanwhile (steadier than the rate on
    a shared machine: it leaves out waiting for the broker and the database)."""

    last = f"burst-{n - 1:06d}"

    def taken_in() -> bool:
        # Polled every 50 ms: a count of up to n rows each time (2.5 ms of the database's
        # time at 10,000) would weigh on what is measured. One consumer commits in delivery
        # order, so the last job is in when everything is; the count confirms it, once.
        with pool.connection() as pg:
            if count == 1 and processes == 0 and jobs.get_job(pg, settings.fleet_id, last) is None:
                return False
            return capacity.count_active(pg, settings.fleet_id) >= n

    if processes == 0:
        intake = Intake(settings, pool)
        consumers = [JobsConsumer(settings, intake) for _ in range(count)]
        start, cpu = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=c.run, daemon=True) for c in consumers]
        for thread in threads:
            thread.start()
        while not taken_in():
            time.sleep(0.05)
        absorbed, cpu = time.perf_counter() - start, time.process_time() - cpu
        for consumer, thread in zip(consumers, threads, strict=True):
            consumer.request_stop()
            thread.join(30)
        return absorbed, cpu
    context = multiprocessing.get_context("spawn")
    ready, go, stop = context.Semaphore(0), context.Event(), context.Event()
    children = [
        context.Process(target=_worker_process, args=(fields, count, ready, go, stop))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    for _ in children:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    while not taken_in():
        time.sleep(0.05)
    absorbed = time.perf_counter() - start
    stop.set()
    for child in children:
        child.join(60)
    return absorbed, None


def run_once(n: int, count: int, payloads: list[bytes], processes: int = 0) -> Run:
    """One side-by-side run on a scratch database and scratch queues, all removed after."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    database = f"bw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    database_url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{database}"))
    fields: dict[str, Any] = {
        "broker_url": BROKER_URL,
        "database_url": database_url,
        "jobs_queue": f"{prefix}.jobs",
        "dlq": f"{prefix}.jobs.dlq",
        "events_exchange": f"{prefix}.events",
        "fleet_id": prefix,
        "worker_name": "bench",
    }
    settings = Settings(**fields)
    pool = db.open_pool(settings, min_size=2, max_size=8)
    try:
        db.ensure_schema(pool)
        with connection(settings, purpose="bench") as conn:
            declare_topology(conn, settings)
            channel = conn.channel()
            # The publisher's rate swings by a third from one 10,000-message publish to the
            # next on this machine: the median of three, each into a fresh quorum queue.
            seconds = []
            for attempt in range(3):
                baseline_queue = f"{prefix}.baseline{attempt}"
                channel.queue_declare(
                    baseline_queue,
                    durable=True,
                    auto_delete=False,
                    arguments={"x-queue-type": "quorum"},
                )
                seconds.append(publish_pipelined(baseline_queue, payloads))
                channel.queue_delete(baseline_queue)
            baseline = sorted(seconds)[1]
            # The burst, queued before the worker starts taking it in.
            publish_pipelined(settings.jobs_queue, payloads)

            absorbed, cpu = absorb(settings, fields, pool, n, count=count, processes=processes)

            relay = Relay(settings, pool)
            start = time.perf_counter()
            relay_thread = threading.Thread(target=relay.run, daemon=True)
            relay_thread.start()
            while True:
                with pool.connection() as pg:
                    if outbox.pending_count(pg) == 0:
                        break
                time.sleep(0.05)
            relayed = time.perf_counter() - start
            relay.request_stop()
            relay_thread.join(30)
            for name in (settings.jobs_queue, settings.dlq, f"{settings.events_exchange}.unrouted"):
                channel.queue_delete(name)
            for name in (settings.events_exchange, f"{settings.events_exchange}.unrouted"):
                channel.exchange_delete(name)
    finally:
        pool.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return Run(n / baseline, n / absorbed, n / relayed, cpu * 1e6 / n if cpu else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--consumers", type=int, default=1, help="intake consumers at once")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="intake in N worker processes (the fleet design) instead of in this one",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs in a row (a noisy machine: take the median)"
    )
    args = parser.parse_args()
    tune_gc()  # as the daemon does
    n = args.jobs
    payloads = bodies(n)
    where = f" in each of {args.processes} worker processes" if args.processes else ""
    print(f"jobs: {n}, body {len(payloads[0])} bytes, {args.consumers} intake consumer(s){where}")
    runs = []
    for index in range(args.repeat):
        run = run_once(n, args.consumers, payloads, args.processes)
        runs.append(run)
        print(
            f"run {index + 1}: one client, confirms pipelined {run.publish:6.0f} msg/s;"
            f" intake {run.intake:6.0f} jobs/s; relay {run.relay:6.0f} events/s;"
            f" ratio intake / publish {run.ratio:.2f}"
            + (f"; intake CPU {run.cpu_per_job:4.0f} µs/job" if run.cpu_per_job else "")
        )
    middle = sorted(runs, key=lambda r: r.ratio)[len(runs) // 2]
    print(f"one client, confirms pipelined: {middle.publish:8.0f} msg/s")
    print(f"intake absorbs the burst:      {middle.intake:8.0f} jobs/s")
    cpus = sorted(r.cpu_per_job for r in runs if r.cpu_per_job)
    if cpus:
        print(f"intake's CPU (median):         {cpus[len(cpus) // 2]:8.0f} µs/job")
    print(f"relay publishes the accepted:  {middle.relay:8.0f} events/s")
    label = "ratio intake / publish" + (f" (median of {len(runs)} runs)" if len(runs) > 1 else "")
    print(f"{label}: {middle.ratio:.2f} (target >= 0.25)")


if __name__ == "__main__":
    main()
