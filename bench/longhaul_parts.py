"""The long-haul bench's parts: a PostgreSQL cluster of its own, the event log, and the
watch on a killed worker's jobs (bench/bench_longhaul.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg

from tests.conftest import pika_parameters
from tests.e2e.conftest import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TERMINAL = {"DONE", "FAILED", "STOPPED"}
WATCH_EVERY = 0.02  # seconds between looks at the killed worker's jobs


class PgCluster:
    """A PostgreSQL cluster of the bench's own (trust auth, loopback, its own port)."""

    def __init__(self, base: Path) -> None:
        self.data = base / "pgdata"
        self.port = free_port()
        self.log = base / "pg.log"
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")  # initdb refuses to run as root
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [
                *self._as,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [
                *self._as,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                *args,
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class EventLog:
    """Every event, from a durable queue of the bench's own: it outlives a broker restart."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange
        self.queue = f"bench-events-{uuid.uuid4().hex[:6]}"
        self.terminal: dict[str, set[str]] = {}
        self._conn: pika.BlockingConnection | None = None

    def pump(self) -> None:
        try:
            if self._conn is None or not self._conn.is_open:
                self._conn = pika.BlockingConnection(pika_parameters(self.url))
                ch = self._conn.channel()
                ch.queue_declare(self.queue, durable=True)
                ch.queue_bind(self.queue, self.exchange, routing_key="#")
            ch = self._conn.channel()
            while True:
                method, _props, body = ch.basic_get(self.queue, auto_ack=True)
                if method is None:
                    break
                event = json.loads(body)
                if (
                    event["type"] == "batchworker.job.status"
                    and event["data"]["status"] in TERMINAL
                ):
                    self.terminal.setdefault(event["subject"], set()).add(event["id"])
            ch.close()
        except (pika.exceptions.AMQPError, OSError):
            self._conn = None  # the broker is restarting: read again later


@dataclass
class Takeover:
    """One kill, in seconds from it: when the killed worker's mark (its advisory lock) was
    gone, when a peer ran out its leases (its ``bw_workers`` row deleted), and per job it
    held, when another worker claimed it (generation bumped) and first saved a step of it
    (``derived_rev`` bumped: every step's save raises it)."""

    worker: str
    held: int
    lock_gone: float | None = None
    reaped: float | None = None
    claimed: dict[str, float] = field(default_factory=dict)
    stepped: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.stepped) == self.held

    @property
    def recovered(self) -> float | None:
        """When the last of its jobs was stepped again."""
        return max(self.stepped.values()) if self.done and self.stepped else None


# The mark of docs/reliability.md: the fleet's advisory lock space, keyed by the name's hash.
_LOCK_HELD = """
    SELECT count(*) FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = x'62776D6B'::bigint::oid
      AND objsubid = 2
      AND objid = ((hashtext(%(fleet)s || '/' || %(worker)s))::bigint & 4294967295)::oid
"""


def held_by(url: str, fleet: str, owner: str) -> dict[str, tuple[int, int]]:
    """The jobs ``owner`` holds: job -> (generation, derived_rev)."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT job_id, generation, COALESCE(derived_rev, 0) FROM bw_jobs"
                " WHERE fleet_id = %s AND lease_owner = %s",
                (fleet, owner),
            ).fetchall()
    except psycopg.Error:
        return {}
    return {r[0]: (r[1], r[2]) for r in rows}


def watch_takeover(
    url: str,
    fleet: str,
    worker: str,
    held: dict[str, tuple[int, int]],
    killed: float,
    *,
    timeout: float = 120.0,
) -> Takeover:
    """Watch the killed worker's jobs until every one was stepped by another (or timeout)."""
    seen = Takeover(worker, len(held))
    params: dict[str, Any] = {"fleet": fleet, "worker": worker, "jobs": list(held)}
    conn: psycopg.Connection[Any] | None = None
    while not seen.done and time.monotonic() < killed + timeout:
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(url, connect_timeout=3, autocommit=True)
            at = time.monotonic() - killed
            if seen.lock_gone is None:
                row = conn.execute(_LOCK_HELD, params).fetchone()
                if row is not None and row[0] == 0:
                    seen.lock_gone = at
            if (
                seen.reaped is None
                and not conn.execute(
                    "SELECT 1 FROM bw_workers WHERE fleet_id = %(fleet)s AND worker = %(worker)s",
                    params,
                ).fetchone()
            ):
                seen.reaped = at
            rows = conn.execute(
                "SELECT job_id, generation, lease_owner, COALESCE(derived_rev, 0) FROM bw_jobs"
                " WHERE fleet_id = %(fleet)s AND job_id = ANY(%(jobs)s)",
                params,
            ).fetchall()
        except psycopg.Error:
            conn = None  # PostgreSQL restarting
            time.sleep(0.2)
            continue
        for job, generation, owner, rev in rows:
            was_generation, was_rev = held[job]
            if job not in seen.claimed and generation > was_generation and owner != worker:
                seen.claimed[job] = at
            if job not in seen.stepped and rev > was_rev and generation > was_generation:
                seen.stepped[job] = at
                seen.claimed.setdefault(job, at)
        time.sleep(WATCH_EVERY)
    if conn is not None:
        conn.close()
    return seen


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]
