"""Running ``python -m worker ...`` as a user would, against the daemon tests' stack.

The stack fixtures (simulator, RabbitMQ names, PostgreSQL, moto S3, worker processes, an
event reader, a pika producer) are the e2e harness's own; a CLI test module takes them with
``pytest_plugins = ("tests.cli_support",)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import (  # noqa: F401 - fixtures, found by pytest
    REPO,
    Events,
    Producer,
    Stack,
    WorkerProcess,
    dlq_messages,
    events,
    producer,
    simulator,
    stack,
    start_worker,
    take_all,
)

# Wide enough that rich never wraps a table cell of ours (rich reads COLUMNS).
_COLUMNS = "200"


def clean_env(**values: Any) -> dict[str, str]:
    """The process environment without any BATCH_WORKER_* of the caller, plus ``values``
    (keys without the prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_WORKER_")}
    env.update({f"BATCH_WORKER_{k.upper()}": str(v) for k, v in values.items()})
    env["COLUMNS"] = _COLUMNS
    # No .env of a developer's checkout, no mounted secrets: only what the test says.
    env.setdefault("BATCH_WORKER_SECRETS_DIR", "/nonexistent")
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m worker ARGS`` to its end; stdout and stderr kept apart."""
    env = {**env, "COLUMNS": _COLUMNS}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def done_and_failed(
    on: Stack, publisher: Producer, seen: Events
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Two jobs of two features each run to their ends by a started worker: one DONE, one
    whose analysis fails; (done, failed, the done one's terminal event)."""
    done = on.payload("max-ndvi-zarr.json", features=2)
    failed = on.payload("max-ndvi-geotiff.json", features=2)
    failed["request"]["description"] += " [sim:fail-analysis]"
    for job in (done, failed):
        publisher.publish(job)
    final = seen.wait_terminal(done["job_id"], timeout=120)
    seen.wait_terminal(failed["job_id"], timeout=120)
    return done, failed, final


def write_job(tmp: Path, job: dict[str, Any], name: str = "job.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(job))
    return path
