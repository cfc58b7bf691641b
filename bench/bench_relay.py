"""Publish rate of the relay beside kombu with one-at-a-time confirms and without confirms.

Each way publishes the same N persistent messages to one quorum queue on the local broker;
the relay's figure runs from N outbox rows to all of them confirmed and deleted. Run:

    PYTHONPATH=. python bench/bench_relay.py [N]

Needs RabbitMQ and PostgreSQL at the test URLs (BATCH_WORKER_TEST_BROKER_URL,
BATCH_WORKER_TEST_DATABASE_URL). Prints msgs/s and ratios; no pass/fail.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
from kombu import Connection, Producer
from psycopg_pool import ConnectionPool

from worker import outbox
from worker.events import OutboxMessage
from worker.relay import Relay
from worker.settings import Settings

BROKER_URL = os.environ.get("BATCH_WORKER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
PG_URL = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BODY = b"x" * 1024


def _queue(conn: Connection, name: str) -> None:
    conn.default_channel.queue_declare(
        name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
    )


def kombu_rate(n: int, queue: str, *, confirms: bool) -> float:
    with Connection(BROKER_URL, transport_options={"confirm_publish": confirms}) as conn:
        _queue(conn, queue)
        producer = Producer(conn)
        start = time.perf_counter()
        for i in range(n):
            producer.publish(
                BODY,
                routing_key=queue,
                content_type="application/octet-stream",
                content_encoding="binary",
                delivery_mode=2,
                message_id=str(i),
            )
        elapsed = time.perf_counter() - start
        conn.default_channel.queue_delete(queue)
    return n / elapsed


def relay_rate(n: int, queue: str, database_url: str) -> float:
    settings = Settings(
        broker_url=BROKER_URL,
        database_url=database_url,
        jobs_queue=f"{queue}.jobs",
        dlq=f"{queue}.dlq",
        events_exchange=f"{queue}.events",
    )
    with Connection(BROKER_URL) as conn:
        _queue(conn, queue)
    with ConnectionPool(database_url, min_size=1, max_size=2, open=True) as pool:
        with pool.connection() as conn, conn.transaction():
            outbox.ensure_schema(conn)
            outbox.enqueue(
                conn,
                [
                    OutboxMessage("", queue, BODY, {"message_id": str(i), "delivery_mode": 2})
                    for i in range(n)
                ],
            )
        relay = Relay(settings, pool)
        try:
            relay.relay_once()  # connects and publishes a first round: not timed apart
            start = time.perf_counter()
            while relay.relay_once():
                pass
            elapsed = time.perf_counter() - start
            with pool.connection() as conn:
                assert outbox.pending_count(conn) == 0
        finally:
            relay.close()
    with Connection(BROKER_URL) as conn:
        channel = conn.default_channel
        channel.queue_delete(queue)
        for name in (settings.jobs_queue, settings.dlq, f"{settings.events_exchange}.unrouted"):
            channel.queue_delete(name)
        for name in (settings.events_exchange, f"{settings.events_exchange}.unrouted"):
            channel.exchange_delete(name)
    # The first round (batch_size rows) was not timed.
    return max(n - 1000, 1) / elapsed


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    db_name = f"bw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    database_url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{db_name}"))
    try:
        rates = {
            "kombu, no confirms": kombu_rate(n, f"{prefix}.a", confirms=False),
            "kombu, confirm each": kombu_rate(n, f"{prefix}.b", confirms=True),
            "relay (outbox -> confirmed, pipelined)": relay_rate(n, f"{prefix}.c", database_url),
        }
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    baseline = rates["kombu, confirm each"]
    print(f"{n} persistent 1 KiB messages to a quorum queue")
    for name, rate in rates.items():
        print(f"  {name:40s} {rate:10,.0f} msgs/s   x{rate / baseline:5.1f} vs confirm-each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
