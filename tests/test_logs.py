"""worker.logs: JSON and text lines, redaction of everything a record carries."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from worker.logs import NOISY_LOGGERS, rfc3339, setup_logging
from worker.redact import forget_secret, register_secret

SECRET = "s3cr3t-Value-9f8e7d"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, value in noisy.items():
        logging.getLogger(name).setLevel(value)
    logging.captureWarnings(False)


@pytest.fixture
def secret() -> Iterator[str]:
    register_secret(SECRET)
    yield SECRET
    forget_secret(SECRET)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_auto_writes_json_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "auto", stream)
    logging.getLogger("worker.daemon.engine").info(
        "job %s moved", "corsica", extra={"job_id": "corsica", "batch_request_id": "6aa8"}
    )
    [entry] = json_lines(stream)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "worker.daemon.engine"
    assert entry["message"] == "job corsica moved"
    assert entry["job_id"] == "corsica"
    assert entry["batch_request_id"] == "6aa8"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


def test_the_worker_name_is_on_every_json_line() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream, fields={"worker": "node-7-41-9f2c"})
    logging.getLogger("worker.daemon.engine").info("one")
    # A record's own field of that name does not overwrite it.
    logging.getLogger("worker.api").warning("two", extra={"worker": "someone-else"})
    entries = json_lines(stream)
    assert [(e["message"], e["worker"]) for e in entries] == [
        ("one", "node-7-41-9f2c"),
        ("two", "node-7-41-9f2c"),
    ]


def test_auto_writes_text_to_a_terminal() -> None:
    stream = Terminal()
    setup_logging("INFO", "auto", stream)
    logging.getLogger("worker.daemon.engine").warning("slow", extra={"job_id": "corsica"})
    line = stream.getvalue()
    assert not line.startswith("{")
    assert "WARNING" in line
    assert "worker.daemon.engine: slow" in line
    assert "job_id=corsica" in line


def test_explicit_format_wins_over_the_terminal_check() -> None:
    stream = Terminal()
    setup_logging("INFO", "json", stream)
    logging.getLogger("x").info("hello")
    assert json_lines(stream)[0]["message"] == "hello"


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"


def test_level_filters_records() -> None:
    stream = io.StringIO()
    setup_logging("warning", "json", stream)
    logging.getLogger("x").info("dropped")
    logging.getLogger("x").error("kept")
    assert [e["message"] for e in json_lines(stream)] == ["kept"]


def test_calling_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", "json", first)
    setup_logging("INFO", "json", second)
    logging.getLogger("x").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_exception_text_is_included_and_redacted(secret: str) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    try:
        raise RuntimeError(f"token endpoint refused client_secret={secret}")
    except RuntimeError:
        logging.getLogger("worker.api").exception("create failed")
    [entry] = json_lines(stream)
    assert "RuntimeError" in entry["exception"]
    assert "Traceback" in entry["exception"]
    assert secret not in stream.getvalue()


def test_message_and_args_are_redacted(secret: str) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    logging.getLogger("x").info("connecting to %s", f"amqp://user:{secret}@rabbit:5672//")
    logging.getLogger("x").info(f"raw {secret} in the message")
    out = stream.getvalue()
    assert secret not in out
    assert "amqp://user:***@rabbit:5672//" in json_lines(stream)[0]["message"]


def test_extras_are_redacted_deeply(secret: str) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    payload = {"input": {"s3": {"accessKey": "AKIAEXAMPLE", "secretAccessKey": "abc/xyz"}}}
    logging.getLogger("x").info("payload", extra={"request": payload, "note": f"x {secret}"})
    [entry] = json_lines(stream)
    assert entry["request"]["input"]["s3"] == {"accessKey": "***", "secretAccessKey": "***"}
    assert secret not in stream.getvalue()
    assert "AKIAEXAMPLE" not in stream.getvalue()


def test_text_format_is_redacted_too(secret: str) -> None:
    stream = Terminal()
    setup_logging("INFO", "text", stream)
    logging.getLogger("x").info("secret %s", secret, extra={"password": secret})
    assert secret not in stream.getvalue()


def test_an_extra_cannot_overwrite_the_standard_fields() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    logging.getLogger("x").info("real", extra={"time": "fake", "level": "fake"})
    [entry] = json_lines(stream)
    assert entry["level"] == "INFO"
    assert entry["time"] != "fake"


def test_values_json_cannot_encode_become_strings() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    logging.getLogger("x").info("odd", extra={"when": object()})
    assert json_lines(stream)[0]["when"].startswith("<object object")


@pytest.mark.parametrize("name", NOISY_LOGGERS)
def test_noisy_libraries_are_quiet_at_info(name: str) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    logging.getLogger(f"{name}.connection").info("chatter")
    logging.getLogger(f"{name}.connection").warning("worth seeing")
    assert [e["message"] for e in json_lines(stream)] == ["worth seeing"]


@pytest.mark.parametrize("name", NOISY_LOGGERS)
def test_debug_shows_the_workers_decisions_not_the_libraries_wire(name: str) -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream)
    logging.getLogger(f"{name}.endpoint").debug("request details")
    logging.getLogger("worker.daemon.engine").debug("stepped")
    assert [e["message"] for e in json_lines(stream)] == ["stepped"]


def test_the_libraries_wire_logging_when_asked_for() -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream, wire=True)
    logging.getLogger("botocore.endpoint").debug("request details")
    assert [e["message"] for e in json_lines(stream)] == ["request details"]


def test_python_warnings_become_redacted_records(secret: str) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"insecure url https://u:{secret}@host", UserWarning, stacklevel=1)
    [entry] = json_lines(stream)
    assert entry["logger"] == "py.warnings"
    assert secret not in stream.getvalue()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        setup_logging("INFO", "xml")
    with pytest.raises(ValueError, match="level"):
        setup_logging("LOUD")
