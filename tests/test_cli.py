"""``python -m worker``: argument handling, and ``run`` refusing bad configuration the way
the contract says (CONTRACT.md "Configuration": one line per problem, exit 2, no traceback,
never a secret)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest.register_assert_rewrite("tests.cli_support")

from tests.cli_support import REPO, clean_env, run_cli  # noqa: E402
from worker import cli  # noqa: E402
from worker.cli import build_parser  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.wire.topology import definitions, topology  # noqa: E402

SECRET = "s3cr3t-Zq81-never-printed"


def _assert_config_failure(result: subprocess.CompletedProcess[str], *variables: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(variables), lines
    for line, variable in zip(lines, variables, strict=True):
        assert line.startswith("batch-worker: configuration: "), line
        assert variable in line, line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("values", "variables"),
    [
        ({"POLL_INTERVAL": "abc"}, ["BATCH_WORKER_POLL_INTERVAL"]),
        ({"BROKER_URL": "http://x"}, ["BATCH_WORKER_BROKER_URL"]),
        ({"LOG_LEVEL": "chatty"}, ["BATCH_WORKER_LOG_LEVEL"]),
        (
            {"POLL_INTERVAL": "abc", "PREFETCH": "0", "DEPLOYMENT": "mars"},
            ["BATCH_WORKER_DEPLOYMENT", "BATCH_WORKER_POLL_INTERVAL", "BATCH_WORKER_PREFETCH"],
        ),
    ],
)
def test_run_with_invalid_settings_prints_one_line_per_problem_and_exits_2(
    values: dict[str, str], variables: list[str]
) -> None:
    env = clean_env(CLIENT_ID="client", CLIENT_SECRET=SECRET, **values)
    result = run_cli("run", env=env)
    _assert_config_failure(result, *variables)


def test_run_without_credentials_names_both_variables() -> None:
    result = run_cli("run", env=clean_env())
    _assert_config_failure(result, "BATCH_WORKER_CLIENT_ID", "BATCH_WORKER_CLIENT_SECRET")


@pytest.mark.parametrize(
    ("variable", "bad_value"),
    [
        # The bad value is itself the secret, or carries one.
        ("BROKER_URL", f"http://guest:{SECRET}@rabbit:5672//"),
        ("DATABASE_URL", f"mysql://root:{SECRET}@db/jobs"),
        ("API_BUDGET_PER_MINUTE", SECRET),
    ],
)
def test_run_never_prints_a_secret_even_in_the_bad_value(variable: str, bad_value: str) -> None:
    env = clean_env(CLIENT_ID="client", CLIENT_SECRET=SECRET, **{variable: bad_value})
    result = run_cli("run", env=env)
    _assert_config_failure(result, f"BATCH_WORKER_{variable}")
    assert SECRET not in result.stderr


def test_run_reports_a_taken_metrics_port_as_configuration() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # as the probe server does
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            CLIENT_ID="client", CLIENT_SECRET=SECRET, METRICS_PORT=port, LOG_FORMAT="json"
        )
        result = run_cli("run", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip() == (
        "batch-worker: configuration: BATCH_WORKER_METRICS_HOST/PORT:"
        f" cannot listen on 0.0.0.0:{port}: address already in use"
    )


def test_run_binds_the_probe_server_where_it_is_told() -> None:
    # 127.0.0.2 is loopback too: a probe server bound there is not on 127.0.0.1.
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        port = sock.getsockname()[1]
    env = clean_env(
        CLIENT_ID="client",
        CLIENT_SECRET=SECRET,
        METRICS_HOST="127.0.0.2",
        METRICS_PORT=port,
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/none",  # never reached: stops it
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"], cwd=REPO, env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("no probe server on 127.0.0.2")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proc.kill()
        proc.wait()


def test_a_metrics_host_that_is_no_address_stops_start_up() -> None:
    env = clean_env(CLIENT_ID="client", CLIENT_SECRET=SECRET, METRICS_HOST="all-of-them")
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert "BATCH_WORKER_METRICS_HOST" in result.stderr


def test_simulate_on_a_taken_port_says_so_in_one_line_and_exits_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("simulate", "--port", str(port), env=clean_env())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip() == (
        f"batch-worker: simulate: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_a_mistyped_variable_is_named_beside_the_problem_it_causes() -> None:
    env = clean_env(CLIENTID="client", CLIENT_SECRET=SECRET)
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "batch-worker: configuration: BATCH_WORKER_CLIENT_ID: required to run the worker",
        "batch-worker: warning: BATCH_WORKER_CLIENTID (in the environment) is not a setting"
        " and is ignored; did you mean BATCH_WORKER_CLIENT_ID?",
    ]


def test_other_commands_warn_about_unknown_names_before_they_start(tmp_path: Path) -> None:
    env = clean_env(BROKER_ULR=f"amqp://guest:{SECRET}@rabbit//")
    result = run_cli("submit", str(tmp_path / "no-such-job.json"), env=env)
    assert result.returncode == 2  # the missing file: nothing was published
    assert result.stderr.splitlines()[0] == (
        "batch-worker: warning: BATCH_WORKER_BROKER_ULR (in the environment) is not a setting"
        " and is ignored; did you mean BATCH_WORKER_BROKER_URL?"
    )
    assert SECRET not in result.stderr + result.stdout


def _missing_database(server_url: str) -> str:
    return urlunsplit(urlsplit(server_url)._replace(path=f"/bw_missing_{uuid.uuid4().hex[:8]}"))


@pytest.mark.integration
def test_run_against_a_database_that_does_not_exist_says_so_at_once(pg_server_url: str) -> None:
    url = _missing_database(pg_server_url)
    parts = urlsplit(url)
    env = clean_env(
        CLIENT_ID="client",
        CLIENT_SECRET=SECRET,
        DATABASE_URL=url,
        METRICS_PORT=0,
        LOG_FORMAT="json",
        POLL_INTERVL="5",
    )
    started = time.monotonic()
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert time.monotonic() - started < 25  # not the 30 s a server that is down gets
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip() == (
        f"batch-worker: PostgreSQL at {parts.hostname}:{parts.port or 5432}{parts.path}:"
        " the database does not exist (BATCH_WORKER_DATABASE_URL); giving up"
    )
    # The unknown name went to the worker's log, where its start-up is read.
    records = [json.loads(line) for line in result.stdout.splitlines()]
    warnings = [r for r in records if r["level"] == "WARNING" and r["logger"] == "worker.settings"]
    assert [r["message"] for r in warnings] == [
        "BATCH_WORKER_POLL_INTERVL (in the environment) is not a setting and is ignored;"
        " did you mean BATCH_WORKER_POLL_INTERVAL?"
    ]


@pytest.mark.integration
def test_run_with_a_login_postgresql_refuses_names_the_user_not_the_password(
    pg_server_url: str,
) -> None:
    # The test server trusts every local login it knows, so a wrong password cannot be
    # shown here; a role it does not know is a login it refuses all the same.
    parts = urlsplit(pg_server_url)
    role = f"bw_nobody_{uuid.uuid4().hex[:6]}"
    netloc = f"{role}:{SECRET}@{parts.hostname}:{parts.port or 5432}"
    env = clean_env(
        CLIENT_ID="client",
        CLIENT_SECRET="another-one",
        DATABASE_URL=urlunsplit(parts._replace(netloc=netloc)),
        METRICS_PORT=0,
    )
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"batch-worker: PostgreSQL at {parts.hostname}:{parts.port or 5432}{parts.path}:"
        f" authentication failed for user '{role}' (BATCH_WORKER_DATABASE_URL); giving up"
    )
    assert SECRET not in result.stderr + result.stdout


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = ["run", "submit", "status", "dlq", "simulate", "demo"]
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


def test_missing_command_is_a_usage_error() -> None:
    result = run_cli(env=clean_env())
    assert result.returncode == 2
    assert "usage: batch-worker" in result.stderr


def test_dlq_replay_needs_a_message_or_all() -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["dlq", "replay"])
    assert exit_info.value.code == 2
    args = build_parser().parse_args(["dlq", "replay", "--all"])
    assert args.all and args.message is None


def test_simulate_help_lists_the_simulator_settings() -> None:
    result = run_cli("simulate", "--help", env=clean_env())
    assert result.returncode == 0
    for option in ("--host", "--port", "--speed", "--rate-429"):
        assert option in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_simulate_serves_the_batch_api_until_sigterm() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "simulate", "--port", str(port), "--speed", "100"],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/v2/batch/process"
        # The one wait here: the process needs a moment to import and bind.
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError as answer:
                status = answer.code  # no token: the API answers 401, so it is serving
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        assert status == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_definitions_command_writes_the_topology(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_WORKER_JOBS_QUEUE", "other.jobs")
    target = tmp_path / "defs.json"
    assert cli.main(["definitions", str(target)]) == 0
    written = json.loads(target.read_text(encoding="utf-8"))
    expected = definitions(topology(Settings(jobs_queue="other.jobs")))
    assert written == expected
    assert "other.jobs" in {queue["name"] for queue in written["queues"]}


def test_definitions_command_reports_bad_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATCH_WORKER_HEARTBEAT", "-1")
    with pytest.raises(SystemExit) as exited:
        cli.main(["definitions", str(tmp_path / "x.json")])
    assert exited.value.code == 2
    assert "BATCH_WORKER_HEARTBEAT" in capsys.readouterr().err


def test_definitions_command_prints_them_without_a_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATCH_WORKER_DLQ", "other.dlq")
    assert cli.main(["definitions"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == definitions(topology(Settings(dlq="other.dlq")))


def test_schemas_command_checks_the_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schemas", "--check"]) == 0
    assert capsys.readouterr().err == ""


def test_a_closed_pipe_ends_quietly() -> None:
    # `batch-worker definitions | head -c0`: the reader is gone before the first write.
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "definitions"],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""
