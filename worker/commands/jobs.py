"""``batch-worker jobs``: the fleet's jobs, filtered and paged, from the durable state.

The same query as the status API's ``/api/v1/jobs`` (``worker.store.listing``): a table on
a terminal, one tab-separated line per job with whole ids elsewhere, or the API's JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import psycopg

from worker.settings import Settings
from worker.store import db, listing

_COLUMNS = ("job_id", "status", "completion", "tiles", "cost_pu", "accepted_at", "batch_request")


def _row(job: dict[str, Any]) -> tuple[str, ...]:
    tiles = job["tiles"] or {}
    return (
        job["job_id"],
        job["status"] or job["phase"],
        f"{job['completion_percentage']:.0f}%",
        f"{tiles.get('processed', 0)}/{tiles.get('failed', 0)}/{tiles.get('total', '-')}"
        if tiles
        else "-",
        f"{job['cost_pu']:g}" if job["cost_pu"] is not None else "-",
        job["accepted_at"],
        job["batch_request_id"] or "-",
    )


def list_jobs(settings: Settings, spec: listing.JobFilter, *, as_json: bool) -> int:
    url = settings.database_url.get_secret_value()
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            page, total = listing.list_jobs(conn, spec)
    except psycopg.errors.UndefinedTable:
        page, total = [], 0  # no worker of this database has started: no job
    except psycopg.OperationalError as exc:
        print(f"{db.connect_problem(url, exc)} (BATCH_WORKER_DATABASE_URL)", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(spec.page(page, total), indent=2))
        return 0
    rows = [_row(job) for job in page]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*_COLUMNS, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        console = Console()
        console.print(table)
        shown = f"{spec.offset + 1}-{spec.offset + len(rows)}" if rows else "none"
        console.print(f"[dim]{shown} of {total} job(s) in fleet {spec.fleet_id}[/dim]")
    else:
        # Whole values, one line each: for grep, cut and awk.
        for row in rows:
            print("\t".join(row))
    return 0
