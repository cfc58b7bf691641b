"""``python -m worker demo``: the whole product on one machine, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import requests

pytest.register_assert_rewrite("tests.cli_support")

from tests.cli_support import REPO, clean_env, run_cli  # noqa: E402
from tests.conftest import AmqpNames  # noqa: E402
from worker.commands.demo import DEMO_DATABASE_PREFIX, EXAMPLES, run_demo  # noqa: E402
from worker.settings import Settings  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def demo_env(
    broker_url: str, pg_server_url: str, amqp_names: AmqpNames, tmp_path: Path
) -> dict[str, str]:
    """The demo's environment: this test's own AMQP names (deleted afterwards), run from
    ``tmp_path`` so its log lands there."""
    env = clean_env(broker_url=broker_url, database_url=pg_server_url, **amqp_names.settings())
    env["PYTHONPATH"] = str(REPO)
    return env


def _example_job_ids() -> list[str]:
    return sorted(
        json.loads(entry.read_text())["job_id"]
        for entry in EXAMPLES.iterdir()
        if entry.name.endswith(".json")
    )


def test_demo_runs_the_examples_to_their_ends_and_moves_off_a_taken_port(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # as the probe server binds
        taken.listen()
        port = taken.getsockname()[1]
        demo_env["BATCH_WORKER_METRICS_PORT"] = str(port)
        # Waits for the jobs at x300: the longest (the forecast's) takes some 20 seconds.
        result = run_cli(
            "demo", "--speed", "300", "--exit", env=demo_env, cwd=tmp_path, timeout=180
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^status page: http://127\.0\.0\.1:\d+/ ", result.stdout, re.M)
    assert "Traceback" not in result.stdout + result.stderr
    assert f"port {port} is taken: metrics on port " in result.stdout
    # Off a terminal the summary is tab-separated lines: job, batch request, status, ...
    cells = {
        line.split("\t")[0]: line.split("\t")[1:]
        for line in result.stdout.splitlines()[1:]
        if "\t" in line and not line.startswith("job\t")
    }
    rows = {job: row[1] for job, row in cells.items()}
    assert sorted(rows) == _example_job_ids()
    # All end DONE but the one forecast at 3x its cap, stopped by its forecast.
    assert rows.pop("corsica-cost-forecast") == "STOPPED (COST_FORECAST)"
    assert set(rows.values()) == {"DONE"}
    # A DONE job has counted every feature (processed/failed/total), the resumed one too:
    # its eight features, billed the 100 PU minimum once (the simulator continues).
    for job in rows:
        processed, failed, total = map(int, cells[job][2].split("/"))
        assert total > 0 and processed + failed == total, (job, cells[job])
    assert cells["corsica-resume-unhealthy"][2:4] == ["8/0/8", "100.0"]
    log = (tmp_path / "demo-output" / "worker.log").read_text()
    assert '"logger": "worker.daemon.supervisor"' in log


# `python -m worker demo` with SIGINT handled as at a terminal: a test run started in the
# background by a non-interactive shell (`make test &`) has SIGINT ignored, the child would
# inherit that, and Python installs no KeyboardInterrupt handler for an ignored SIGINT.
DEMO_AS_AT_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['batch-worker', 'demo']; runpy.run_module('worker', run_name='__main__')"
)


@contextmanager
def _demo_at_a_terminal(
    env: dict[str, str], cwd: Path, until: Callable[[str], bool], *options: str
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """The demo started as at a terminal, its output read up to the first line ``until``
    takes; killed on the way out if it still runs."""
    argv = ", ".join(repr(arg) for arg in ("demo", *options))
    process = subprocess.Popen(
        [sys.executable, "-c", DEMO_AS_AT_A_TERMINAL.replace("'demo'", argv)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if until(line):
                break
        yield process, seen
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_ends_the_demo_cleanly(demo_env: dict[str, str], tmp_path: Path) -> None:
    published = _demo_at_a_terminal(demo_env, tmp_path, lambda line: line.startswith("published "))
    with published as (process, seen):
        assert seen and seen[-1].startswith("published "), "".join(seen)
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=60)
    assert process.returncode == 130, errors
    assert "demo: interrupted; everything it started has stopped" in rest
    assert "Traceback" not in errors


def test_the_demo_keeps_its_status_page_up_until_ctrl_c(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    with _demo_at_a_terminal(
        demo_env,
        tmp_path,
        lambda line: "press Ctrl-C to stop" in line,
        "--keep-running",
        "--speed",
        "300",
    ) as (process, seen):
        [page] = re.findall(r"stays up at (http://127\.0\.0\.1:\d+/)", seen[-1])
        # After the jobs' end the page and its API still answer, with the demo's jobs.
        jobs = requests.get(page + "api/v1/jobs", timeout=30).json()
        assert sorted(job["job_id"] for job in jobs["jobs"]) == _example_job_ids()
        ends = {job["job_id"]: job["status"] for job in jobs["jobs"]}
        # All DONE but the one its cost forecast stops.
        assert ends.pop("corsica-cost-forecast") == "STOPPED"
        assert set(ends.values()) == {"DONE"}
        done = sorted(ends)[0]  # a DONE job: the stopped one leaves features PENDING
        assert requests.get(page + "job?id=" + done, timeout=30).ok
        features = requests.get(page + f"api/v1/jobs/{done}/features", timeout=30).json()
        assert features["features"] and features["counts"]["PENDING"] == 0
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
    with pytest.raises(requests.ConnectionError):
        requests.get(page, timeout=5)


def test_the_demo_leaves_no_thread_or_server_behind(
    broker_url: str,
    pg_server_url: str,
    amqp_names: AmqpNames,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    aws_before = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    settings = Settings(
        broker_url=broker_url, database_url=pg_server_url, metrics_port=0, **amqp_names.settings()
    )
    before = set(threading.enumerate())
    assert run_demo(settings, speed=300) == 0
    # Its own database is gone with it.
    [database] = re.findall(rf"database ({DEMO_DATABASE_PREFIX}\w+)", capsys.readouterr().out)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        assert found.fetchone() is None
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == aws_before
    left = [thread.name for thread in set(threading.enumerate()) - before if thread.is_alive()]
    assert left == []


def test_the_demo_names_what_it_cannot_use_and_exits_2(pg_server_url: str) -> None:
    parts = urlsplit(pg_server_url)
    env = clean_env(
        broker_url="amqp://guest:pw-Zq81x@127.0.0.1:1//",  # nothing listens on port 1
        database_url=urlunsplit(parts._replace(path="/bw_no_such_database")),
    )
    result = run_cli("demo", env=env)
    assert result.returncode == 2
    assert result.stdout.splitlines()[:2] == [
        'demo: cannot reach RabbitMQ at 127.0.0.1:1 vhost "/" (no TLS): [Errno 111] Connection'
        " refused (BATCH_WORKER_BROKER_URL)",
        f"demo: PostgreSQL at {parts.hostname}:{parts.port or 5432}/bw_no_such_database: the"
        " database does not exist (BATCH_WORKER_DATABASE_URL)",
    ]
    assert "pw-Zq81x" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
