"""No credential of a job request in any log line, whatever PostgreSQL's error says back.

A request holding ``\\u0000`` cannot be stored (jsonb has no NUL), and PostgreSQL's error
quotes an excerpt of the JSON around it: the tail of an S3 ``secretAccessKey``, cut from
the key that names it, reached an ERROR line this way. Against a real PostgreSQL.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.test_intake import PAYLOAD, msg, outbox_rows
from tests.daemon.test_intake_tenancy import intake_for
from worker.logs import setup_logging

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"


def with_keys(description: str) -> dict[str, object]:
    delivery = {"s3": {"url": "s3://b/out", "accessKey": ACCESS, "secretAccessKey": SECRET}}
    output = {**PAYLOAD["output"], "delivery": delivery}  # type: ignore[dict-item]
    return {**PAYLOAD, "output": output, "description": description}


def fragments(secret: str, size: int = 6) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def leaked(text: str) -> set[str]:
    return {piece for piece in fragments(SECRET) | fragments(ACCESS) if piece in text}


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream)
    yield stream
    logging.getLogger().handlers.clear()


def test_a_database_error_quoting_a_request_logs_no_part_of_its_keys(
    pool: ConnectionPool, log_lines: io.StringIO
) -> None:
    # The key comes first and the NUL last: the excerpt holds the secret's tail only.
    document = json.dumps({"output": with_keys("x")["output"], "description": "a\u0000b"})
    with pool.connection() as conn, pytest.raises(psycopg.Error) as raised:
        conn.execute("SELECT %s::jsonb", (document,))
    assert leaked(str(raised.value))  # what PostgreSQL said does hold part of the secret
    logging.getLogger("worker.daemon.intake").error("failed", exc_info=raised.value)
    text = log_lines.getvalue()
    assert "JSON data, line 1" in text  # the line was written, its excerpt masked
    assert leaked(text) == set()


def test_intake_logs_no_part_of_the_keys_of_a_request_it_cannot_store(
    pool: ConnectionPool, log_lines: io.StringIO
) -> None:
    body = {"job_id": "nul-1", "request": with_keys("corsica \u0000")}
    intake_for(pool).handle_batch([msg(body)])
    assert leaked(log_lines.getvalue()) == set()
    # Refused at reading (it could never be stored), not as an INTERNAL_ERROR, and
    # dead-lettered whole.
    rows = outbox_rows(pool)
    assert [key for _, key, _, _ in rows] == ["command.rejected", "t.dlq"]
    assert rows[0][2]["data"]["code"] == "INVALID_FIELD"
