"""Publish rate of the relay beside kombu with one-at-a-time confirms and without confirms.

Each way publishes the same N persistent messages to one quorum queue on the local broker;
the relay's figure runs from N outbox rows to all of them confirmed and deleted. Run:

    PYTHONPATH=. python bench/bench_relay.py [N] [--baseline REV] [--repeat K] [--chunks 100,1000]

``--baseline REV`` also runs worker/daemon/relay.py as it was at git revision REV (say, before a
change to the relay), in the same run, alternating with the current one ``--repeat`` times:
the ratio between them is the figure, not the absolute rates of a shared machine.

Needs RabbitMQ and PostgreSQL at the test URLs (BATCH_WORKER_TEST_BROKER_URL,
BATCH_WORKER_TEST_DATABASE_URL). Prints msgs/s and ratios; no pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from kombu import Connection, Producer
from psycopg_pool import ConnectionPool

from worker.daemon import relay as current_relay
from worker.settings import Settings
from worker.store import outbox
from worker.wire.outgoing import OutboxMessage

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


def relay_at(rev: str) -> ModuleType:
    """worker/daemon/relay.py as it was at ``rev``, imported as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:worker/daemon/relay.py"], cwd=root, check=True, capture_output=True
    ).stdout
    path = Path(f"/tmp/bw_relay_{rev.replace('/', '_')}.py")
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"relay_{uuid.uuid4().hex[:6]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def relay_rate(
    n: int, queue: str, database_url: str, module: ModuleType = current_relay, **kwargs: Any
) -> float:
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
        relay = module.Relay(settings, pool, **kwargs)
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
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=20_000)
    parser.add_argument("--baseline", help="git revision of worker/daemon/relay.py to compare with")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--chunks",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[current_relay.CHUNK_SIZE, 1000],
        help="chunk sizes of the current relay to run, comma-separated",
    )
    args = parser.parse_args()
    n = args.n
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    db_name = f"bw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    database_url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{db_name}"))
    relays: dict[str, tuple[ModuleType, dict[str, Any]]] = {
        f"relay, chunks of {chunk}": (current_relay, {"chunk_size": chunk}) for chunk in args.chunks
    }
    if args.baseline:
        relays[f"relay at {args.baseline} (baseline)"] = (relay_at(args.baseline), {})
    runs: dict[str, list[float]] = {}
    try:
        runs["kombu, no confirms"] = [kombu_rate(n, f"{prefix}.a", confirms=False)]
        runs["kombu, confirm each"] = [kombu_rate(n, f"{prefix}.b", confirms=True)]
        for round_ in range(args.repeat):
            for index, (name, (module, kwargs)) in enumerate(relays.items()):
                queue = f"{prefix}.r{round_}{index}"
                rate = relay_rate(n, queue, database_url, module, **kwargs)
                runs.setdefault(name, []).append(rate)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    baseline = runs["kombu, confirm each"][0]
    print(f"{n} persistent 1 KiB messages to a quorum queue; relay runs alternate, {args.repeat}x")
    for name, rates in runs.items():
        rate = sorted(rates)[len(rates) // 2]
        shown = " ".join(f"{r:,.0f}" for r in rates)
        print(f"  {name:42s} median {rate:8,.0f} msgs/s  x{rate / baseline:4.1f}  ({shown})")
    if args.baseline:
        base = sorted(runs[f"relay at {args.baseline} (baseline)"])[args.repeat // 2]
        for name in list(relays)[: len(args.chunks)]:
            rate = sorted(runs[name])[args.repeat // 2]
            print(f"  {name} / baseline: {rate / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
