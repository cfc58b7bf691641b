"""Memory of large job requests: the process's resident size before, at its peak and after.

Each scenario runs in a fresh interpreter and takes N messages in through intake against
PostgreSQL (one batch each, as the consumer hands them over), then collects garbage:

- ``oversized``: N bodies of 5 MiB, refused at the door (``REQUEST_TOO_LARGE``) and
  dead-lettered whole;
- ``at-limit``: N valid submits of just under 256 KiB (a long evalscript), accepted;
- ``unlimited``: N valid submits of 5 MiB taken in with the limit lifted: what the worker
  did before it (each stored as a job, its events written);
- ``parsed-5mib``: N bodies of 5 MiB parsed as the worker did before the limit (json.loads
  and the model), for the side-by-side figure; no database;
- ``oversized-kept``: ``oversized`` as the worker did before memory was given back: the
  allocator's mmap threshold left to move, and the intake connection kept however large
  a message went through it (the baseline);
- ``relayed``: N outbox rows of 5 MiB (dead letters) published by the relay to RabbitMQ
  (the first one before "before": the relay connected and running), ``relayed-kept`` the
  same as before (threshold moving, the relay's connection kept);
- ``-pinned`` after a name: the last message stays referenced (one live 5 MiB buffer,
  counted in "after"), as the first version of this bench left it by mistake: it shows
  what one live allocation above freed buffers does to a heap that must shrink from the
  top.

Every scenario but the baseline starts as ``batch-worker run`` does
(``worker.memory.return_large_frees``).

Run: PYTHONPATH=. python bench/bench_large_requests.py [N]
Needs PostgreSQL at BATCH_WORKER_TEST_DATABASE_URL and, for ``relayed``, RabbitMQ at
BATCH_WORKER_TEST_BROKER_URL (defaults: the local servers). Prints MiB.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import uuid

import psycopg

SERVER = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER = os.environ.get("BATCH_WORKER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def body(size: int, n: int) -> bytes:
    script = "x" * max(0, size - 200)
    return json.dumps(
        {"job_id": f"big-{n}", "request": {"description": "big", "evalscript": script}}
    ).encode()


def scenario(name: str, count: int, database_url: str) -> None:
    from worker.daemon.inbound import InboundMessage
    from worker.daemon.intake import Intake
    from worker.memory import return_large_frees
    from worker.settings import Settings
    from worker.store import db
    from worker.wire import job_requests, request_parsing

    # "-pinned": the last message stays referenced, as the first version of this bench left
    # it: one live buffer above the freed ones, where whatever a process allocates for good
    # may land, and the heap cannot shrink below it.
    pinned = name.endswith("-pinned")
    name = name.removesuffix("-pinned")
    size = 5 * 1024 * 1024 if name != "at-limit" else job_requests.MAX_REQUEST_BYTES - 64
    if name == "oversized-kept":
        db.LARGE_MESSAGE_BYTES = 1 << 40
    else:
        return_large_frees()
    if name == "unlimited":
        request_parsing.MAX_REQUEST_BYTES = 1 << 40  # the name parse_job_request reads
    pool = db.open_pool(database_url, max_size=2) if name != "parsed-5mib" else None
    if pool is not None:
        db.ensure_schema(pool)
    settings = Settings(fleet_id="bench-large", database_url=database_url)
    intake = Intake(settings, pool) if pool is not None else None
    gc.collect()
    kept: list[object] = []
    before = rss_mib()
    for n in range(count):
        raw = body(size, n)
        if intake is None:
            request_parsing._parse_fully(raw, "application/json")
        else:
            message = InboundMessage(
                body=raw,
                content_type="application/json",
                properties={"message_id": f"m{n}"},
                headers={},
                delivery_tag=n + 1,
                redelivered=False,
            )
            intake.handle_batch([message])
            if pinned:
                kept[:] = [message]
            del message
        del raw
    gc.collect()
    after = rss_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_mib()
    if pool is not None:
        pool.close()
    shown = name + ("-pinned" if pinned else "")
    print(
        f"{shown:21} {count:3} x {size / 1024:7.0f} KiB: before {before:6.1f}  peak "
        f"{peak_mib():6.1f}  after {after:6.1f} (+{after - before:.1f})  after malloc_trim "
        f"{trimmed:6.1f} MiB"
    )


def relayed(name: str, count: int, database_url: str) -> None:
    """N outbox rows of 5 MiB (dead letters) published by the relay to RabbitMQ, to a
    routing key no queue is bound to (the broker drops them)."""
    from worker.daemon.relay import Relay
    from worker.memory import return_large_frees
    from worker.settings import Settings
    from worker.store import db, outbox
    from worker.wire.outgoing import OutboxMessage

    if name == "relayed-kept":
        db.LARGE_MESSAGE_BYTES = 1 << 40
    else:
        return_large_frees()
    size = 5 * 1024 * 1024
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox.ensure_schema(conn)
        for n in range(count):  # one at a time: the peak is the relay's, not this
            with conn.transaction():
                row = OutboxMessage(exchange="", routing_key="bw-nowhere", body=body(size, n))
                outbox.enqueue(conn, [row])
            del row
    settings = Settings(fleet_id="bench-large", database_url=database_url, broker_url=BROKER)
    pool = db.open_pool(database_url, max_size=2)
    relay = Relay(settings, pool, batch_size=1, chunk_size=1)
    relay.relay_once()  # connected, the first row out: the process as it runs
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_mib()
    while relay.relay_once():
        pass
    gc.collect()
    after = rss_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_mib()
    relay.close()
    pool.close()
    print(
        f"{name:21} {count - 1:3} x {size / 1024:7.0f} KiB: before {before:6.1f}  peak "
        f"{peak_mib():6.1f}  after {after:6.1f} (+{after - before:.1f})  after malloc_trim "
        f"{trimmed:6.1f} MiB"
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--scenario":
        run = relayed if sys.argv[2].startswith("relayed") else scenario
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    name = f"bw_bench_large_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    database_url = SERVER.rsplit("/", 1)[0] + "/" + name
    try:
        for which in (
            "oversized-kept",
            "oversized",
            "oversized-kept-pinned",
            "oversized-pinned",
            "at-limit",
            "unlimited-pinned",
            "unlimited",
            "parsed-5mib",
            "relayed-kept",
            "relayed",
        ):
            subprocess.run(
                [sys.executable, __file__, "--scenario", which, str(count), database_url],
                check=True,
            )
    finally:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
