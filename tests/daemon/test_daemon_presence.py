"""The presence thread's round against a real PostgreSQL: the mark taken, a dead peer's
leases run out, this worker's own renewed, and the engine's lease question answered."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, claim, insert, job
from worker.daemon.presence import Presence, mark_conninfo
from worker.settings import Settings


def presence_for(database_url: str, name: str, **overrides: object) -> Presence:
    values: dict[str, object] = {
        "database_url": database_url,
        "fleet_id": FLEET,
        "worker_name": name,
        "lease_seconds": 3.0,
    }
    values.update(overrides)
    return Presence(Settings(**values))  # type: ignore[arg-type]


def test_a_peer_that_dies_has_its_jobs_freed_by_the_next_round(
    pool: ConnectionPool, database_url: str
) -> None:
    now = datetime.now(UTC)
    insert(pool, job("a"), now)
    dead, live = presence_for(database_url, "dead"), presence_for(database_url, "live")
    dead.round()
    live.round()
    (held,) = claim(pool, "dead", now=now)
    assert claim(pool, "live", now=now) == []
    dead.close()  # unregisters: a clean exit hands nothing on by itself ...
    dead.round()  # ... so register again, then die without a word
    assert dead._conn is not None
    dead._conn.close()
    deadline = time.monotonic() + 30
    while not claim(pool, "live", now=datetime.now(UTC)):
        assert time.monotonic() < deadline, "the dead worker's job was never freed"
        live.round()
        time.sleep(0.05)
    live.close()
    assert held.generation == 1


def test_renewals_keep_the_lease_valid_and_a_lost_job_is_not(
    pool: ConnectionPool, database_url: str
) -> None:
    now = datetime.now(UTC)
    insert(pool, job("a"), now)
    me = presence_for(database_url, "me")
    (held,) = claim(pool, "me", now=now)
    stepped = time.monotonic()
    assert me.lease_valid("a", held.generation, stepped)
    assert me.renew() == 1
    # Long after the last save, the renewal that found the job ours still vouches for it.
    assert me.lease_valid("a", held.generation, stepped - 60)
    assert not me.lease_valid("a", held.generation + 1, stepped - 60)  # a later claim's
    me.close()


def test_heartbeat_mode_asks_the_server_for_no_startup_options() -> None:
    # PgBouncer (what heartbeat mode is for) refuses a startup `options` it does not know.
    url = "postgresql://u@db:6432/bw"
    locked = conninfo_to_dict(mark_conninfo(url, "w1"))
    beating = conninfo_to_dict(mark_conninfo(url, "w1", server_keepalives=False))
    assert "tcp_keepalives_idle=5" in str(locked["options"])
    assert "options" not in beating
    assert beating["keepalives"] == "1"  # the client's own keepalives stay on
