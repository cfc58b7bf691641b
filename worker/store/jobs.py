"""Job rows in PostgreSQL: durable lifecycle state, and the requests intake leaves.

Every function takes a connection and runs inside the caller's transaction, so intake can
take a whole batch of messages in one commit and the engine can save a step together with
its outbox rows. Times are passed in (``now``) rather than read from the database clock so
the lifecycle, leases and wake-ups all reason with one clock. The leases the engine holds
on these rows: worker/store/leases.py.

The state is stored as JSON and only ever read back whole: what queries select or filter
on is written next to it in columns of its own, derived from the state in Python at every
insert and save (``columns``), the status poller's from ``lifecycle.poll_view``.

This module is what the rest of the worker imports. The statements on ``bw_jobs`` but the
leases' are in three parts: ``job_rows`` (the schema, the derived columns and the insert,
kept together so a column is never added to one and not the other), ``job_intake`` and
``job_polls``.
"""

from worker.store.job_intake import (
    IntakeLookup,
    IntakeView,
    JobRecord,
    get_job,
    request_actions,
    start_intake_lookup,
)
from worker.store.job_polls import (
    PollTarget,
    active_poll_targets,
    count_active_by_status,
    ended_doubtful_targets,
    max_cost_share,
    oldest_seen,
    touch_seen,
)
from worker.store.job_rows import (
    DERIVED,
    DERIVED_SET,
    JOBS_KEY,
    SCHEMA,
    Conn,
    JobRow,
    columns,
    insert_jobs,
    job_row,
    start_insert_jobs,
    tile_columns,
    upgrade,
)

__all__ = [
    "DERIVED",
    "DERIVED_SET",
    "JOBS_KEY",
    "SCHEMA",
    "Conn",
    "IntakeLookup",
    "IntakeView",
    "JobRecord",
    "JobRow",
    "PollTarget",
    "active_poll_targets",
    "columns",
    "count_active_by_status",
    "ended_doubtful_targets",
    "get_job",
    "insert_jobs",
    "job_row",
    "max_cost_share",
    "oldest_seen",
    "request_actions",
    "start_insert_jobs",
    "start_intake_lookup",
    "tile_columns",
    "touch_seen",
    "upgrade",
]
