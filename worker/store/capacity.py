"""The fleet's count of active jobs: what ``MAX_IN_FLIGHT`` caps (docs/design.md, "Schema").

Intake asks for it every batch, and counting the active rows visits each of them (a fresh
row has no visibility-map bit yet: 3.4 ms at 10,000 active jobs, 10.5 ms at 50,000). So the
count is kept as it changes: triggers on ``bw_jobs`` add a row to ``bw_active_deltas`` in
the same transaction as every change to the number of active jobs, and the count is the sum
of the fleet's rows, what counting would give in the same snapshot. ``compact`` folds the
rows into one now and then (the daemon's supervisor, every few seconds).
"""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_active_deltas (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fleet_id    text        NOT NULL,
    delta       bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS bw_active_deltas_fleet ON bw_active_deltas (fleet_id);

CREATE OR REPLACE FUNCTION bw_jobs_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bw_active_deltas (fleet_id, delta)
    SELECT fleet_id, count(*) FROM bw_jobs_inserted WHERE ended_at IS NULL GROUP BY fleet_id;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION bw_jobs_count_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO bw_active_deltas (fleet_id, delta) VALUES (OLD.fleet_id, -1);
    ELSE
        INSERT INTO bw_active_deltas (fleet_id, delta)
        VALUES (OLD.fleet_id, CASE WHEN NEW.ended_at IS NULL THEN 1 ELSE -1 END);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION bw_jobs_count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM bw_active_deltas;
    RETURN NULL;
END $$;
"""

# Created once, with the count they keep brought up to date (db.apply_schema): one
# statement-level trigger for inserts (a batch is one delta row), row-level ones, only
# where a row's activeness changes, for the rest.
TRIGGERS = {
    "bw_jobs_count_inserts": """
        CREATE TRIGGER bw_jobs_count_inserts AFTER INSERT ON bw_jobs
        REFERENCING NEW TABLE AS bw_jobs_inserted
        FOR EACH STATEMENT EXECUTE FUNCTION bw_jobs_count_inserted()""",
    "bw_jobs_count_ends": """
        CREATE TRIGGER bw_jobs_count_ends AFTER UPDATE OF ended_at ON bw_jobs
        FOR EACH ROW WHEN ((OLD.ended_at IS NULL) <> (NEW.ended_at IS NULL))
        EXECUTE FUNCTION bw_jobs_count_changed()""",
    "bw_jobs_count_deletes": """
        CREATE TRIGGER bw_jobs_count_deletes AFTER DELETE ON bw_jobs
        FOR EACH ROW WHEN (OLD.ended_at IS NULL) EXECUTE FUNCTION bw_jobs_count_changed()""",
    "bw_jobs_count_truncates": """
        CREATE TRIGGER bw_jobs_count_truncates AFTER TRUNCATE ON bw_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION bw_jobs_count_truncated()""",
}


def install(conn: Conn) -> None:
    """Install the triggers that keep ``bw_active_deltas`` if any is missing, and bring
    the count up to date with the rows as they are. In the caller's transaction; writers
    wait meanwhile (SHARE ROW EXCLUSIVE), so no change slips between the count and the
    triggers."""
    row = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'bw_jobs'::regclass AND tgname = ANY(%s)",
        (list(TRIGGERS),),
    ).fetchone()
    if row is not None and row[0] == len(TRIGGERS):
        return
    conn.execute("LOCK TABLE bw_jobs IN SHARE ROW EXCLUSIVE MODE")
    for name, create in TRIGGERS.items():
        conn.execute(f"DROP TRIGGER IF EXISTS {name} ON bw_jobs")
        conn.execute(create)
    conn.execute("DELETE FROM bw_active_deltas")
    conn.execute(
        "INSERT INTO bw_active_deltas (fleet_id, delta)"
        " SELECT fleet_id, count(*) FROM bw_jobs WHERE ended_at IS NULL GROUP BY fleet_id"
    )


COUNT_ACTIVE = "SELECT COALESCE(sum(delta), 0) FROM bw_active_deltas WHERE fleet_id = %s"
# A fleet's delta rows are folded into one past this many (one per intake batch, one per
# job ended): summing them stays cheap between compactions.
COMPACT_BEYOND = 64
_COMPACT_LOCK = 0x6277_6163  # with the fleet's hash: one compaction per fleet at a time


def count_active(conn: Conn, fleet_id: str) -> int:
    """Jobs of the fleet that have not ended (what ``MAX_IN_FLIGHT`` caps), as the sum of
    its rows in ``bw_active_deltas``: the same number as counting them, in any snapshot."""
    row = conn.execute(COUNT_ACTIVE, (fleet_id,)).fetchone()
    return int(row[0]) if row else 0


def compact(conn: Conn, fleet_id: str) -> bool:
    """Fold the fleet's rows of ``bw_active_deltas`` into one, when there are many; True
    when it did. Rows added meanwhile by transactions this one cannot see stay as they are,
    so the sum never changes."""
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (_COMPACT_LOCK, fleet_id)
        ).fetchone()
        if row is None or not row[0]:
            return False  # another worker is at it
        row = conn.execute(
            "SELECT count(*) FROM bw_active_deltas WHERE fleet_id = %s", (fleet_id,)
        ).fetchone()
        if row is None or row[0] <= COMPACT_BEYOND:
            return False
        conn.execute(
            """
            WITH gone AS (DELETE FROM bw_active_deltas WHERE fleet_id = %(fleet)s
                          RETURNING delta)
            INSERT INTO bw_active_deltas (fleet_id, delta)
            SELECT %(fleet)s, sum(delta) FROM gone HAVING count(*) > 0
            """,
            {"fleet": fleet_id},
        )
    return True
