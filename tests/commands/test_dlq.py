"""``python -m worker dlq list|show|replay|drop|purge`` against the real DLQ (a quorum
queue); part of the broker-facing set that `make test` runs against RabbitMQ 4.0 too."""

from __future__ import annotations

import base64
import json
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest

pytest.register_assert_rewrite("tests.cli_support")

from tests.cli_support import (  # noqa: E402
    REPO,
    Producer,
    Stack,
    WorkerProcess,
    run_cli,
    take_all,
)
from tests.conftest import pika_parameters  # noqa: E402

# The e2e harness's fixtures (stack, start_worker, producer), through cli_support.
pytest_plugins = ("tests.cli_support",)
pytestmark = pytest.mark.integration
# The tests marked `broker` run against RabbitMQ 4.0 as well (make test-rabbitmq4): those
# whose broker's part differs by version (returns, reordering, delivery limits). The rest
# (purge, a slow reader, errors) do the same AMQP on both and run on 3.10 only, for CI time.
broker = pytest.mark.broker

StartWorker = Callable[..., WorkerProcess]


def _ready(stack: Stack, queue: str) -> int:
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    try:
        count: int = conn.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        conn.close()


def _wait_ready(stack: Stack, queue: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _ready(stack, queue) != count:
        assert time.monotonic() < deadline, f"{queue} never held {count} message(s)"
        time.sleep(0.2)


def _without_delivery_count(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A quorum queue stamps ``x-delivery-count`` on every delivery of its own."""
    return {k: v for k, v in (headers or {}).items() if k != "x-delivery-count"}


def _shown(stdout: str) -> tuple[dict[str, Any], bytes]:
    """``dlq show`` output: the properties as JSON, then the body on its own line."""
    properties_text, _, body = stdout.rstrip("\n").rpartition("\n")
    properties: dict[str, Any] = json.loads(properties_text)
    properties["application_headers"] = _without_delivery_count(
        properties.get("application_headers")
    )
    return properties, body.encode()


def _rows(listing: str) -> list[list[str]]:
    return [line.split() for line in listing.splitlines()[1:]]


@pytest.fixture
def rejected(
    stack: Stack, start_worker: StartWorker, producer: Producer
) -> list[tuple[str, dict[str, Any]]]:
    """Two requests the worker dead-lettered (message id, what was published), with the
    worker stopped again so that nothing consumes a replay."""
    worker = start_worker()
    published = [
        (b"{not json", {"headers": {"team": "ndvi"}, "correlation_id": "c-1"}),
        (
            json.dumps({"job_id": "j-explode", "action": "explode"}).encode(),
            {"headers": {"team": "zarr", "attempt": 3}, "correlation_id": "c-2"},
        ),
    ]
    sent = []
    for body, properties in published:
        message_id = f"m-{uuid.uuid4().hex[:8]}"
        producer.publish(body, message_id=message_id, **properties)
        sent.append((message_id, {"body": body, **properties}))
    _wait_ready(stack, stack.names.dlq, 2)
    worker.stop()
    return sent


@broker
def test_list_shows_reason_and_job_id_and_twice_the_same(
    stack: Stack, rejected: list[tuple[str, dict[str, Any]]]
) -> None:
    first = run_cli("dlq", "list", env=stack.env())
    second = run_cli("dlq", "list", env=stack.env())
    assert first.returncode == 0, first.stderr
    # Looking is not taking: the quorum queue got both back, in the same order.
    assert first.stdout == second.stdout
    assert _ready(stack, stack.names.dlq) == 2
    rows = _rows(first.stdout)
    assert [row[:4] for row in rows] == [
        [rejected[0][0], "-", "MALFORMED_JSON", str(len(rejected[0][1]["body"]))],
        [rejected[1][0], "j-explode", "UNKNOWN_ACTION", str(len(rejected[1][1]["body"]))],
    ]

    limited = run_cli("dlq", "list", "--limit", "1", env=stack.env())
    assert len(_rows(limited.stdout)) == 2
    assert limited.stdout.splitlines()[-1] == "... and 1 more (--limit)"

    # A look returns what it fetched to the back of the queue: compared by id, not order.
    as_json = json.loads(run_cli("dlq", "list", "--json", env=stack.env()).stdout)
    assert as_json["queue"] == stack.names.dlq and as_json["more"] == 0
    assert sorted(as_json["messages"], key=lambda m: m["id"]) == sorted(
        [
            {"id": rejected[0][0], "job_id": None, "reason": "MALFORMED_JSON", "bytes": 9},
            {
                "id": rejected[1][0],
                "job_id": "j-explode",
                "reason": "UNKNOWN_ACTION",
                "bytes": len(rejected[1][1]["body"]),
            },
        ],
        key=lambda m: m["id"],
    )
    one = json.loads(run_cli("dlq", "list", "--limit", "1", "--json", env=stack.env()).stdout)
    assert len(one["messages"]) == 1 and one["more"] == 1


@broker
def test_show_prints_the_message_whole(
    stack: Stack, rejected: list[tuple[str, dict[str, Any]]]
) -> None:
    message_id, sent = rejected[1]
    by_id = run_cli("dlq", "show", message_id, env=stack.env())
    assert by_id.returncode == 0, by_id.stderr
    properties, body = _shown(by_id.stdout)
    assert body == sent["body"]
    assert properties["message_id"] == message_id
    assert properties["correlation_id"] == "c-2"
    headers = properties["application_headers"]
    assert headers["team"] == "zarr" and headers["attempt"] == 3
    assert headers["x-batch-worker-reason"] == "UNKNOWN_ACTION"
    assert "action" in headers["x-batch-worker-detail"]

    shown = json.loads(run_cli("dlq", "show", message_id, "--json", env=stack.env()).stdout)
    assert shown["id"] == message_id and shown["body"] == sent["body"].decode()
    assert base64.b64decode(shown["body_base64"]) == sent["body"]
    assert shown["properties"]["application_headers"]["x-batch-worker-reason"] == "UNKNOWN_ACTION"

    missing = run_cli("dlq", "show", "no-such-message", env=stack.env())
    assert missing.returncode == 1
    assert "no dead-lettered message 'no-such-message'" in missing.stderr
    assert _ready(stack, stack.names.dlq) == 2


@broker
def test_replay_sends_the_original_back_and_only_then_drops_it(
    stack: Stack, rejected: list[tuple[str, dict[str, Any]]]
) -> None:
    run_cli("dlq", "list", env=stack.env())  # a redelivery: the DLQ copy gains x-delivery-count
    message_id, sent = rejected[1]
    result = run_cli("dlq", "replay", message_id, env=stack.env())
    assert result.returncode == 0, result.stderr
    assert f"replayed 1 message(s) to {stack.names.jobs_queue}" in result.stdout

    [(properties, body)] = take_all(stack, stack.names.jobs_queue)
    assert body == sent["body"]
    assert properties.message_id == message_id
    assert properties.correlation_id == "c-2"
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    # The producer's headers only: not the worker's reason, not the broker's bookkeeping.
    assert _without_delivery_count(properties.headers) == {"team": "zarr", "attempt": 3}
    remaining = _rows(run_cli("dlq", "list", env=stack.env()).stdout)
    assert [row[0] for row in remaining] == [rejected[0][0]]


@broker
def test_replay_strips_the_brokers_dead_letter_headers(stack: Stack) -> None:
    """A request the broker itself dead-lettered (redelivered past the delivery limit)."""
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        body = json.dumps({"job_id": "j-poison", "request": {}}).encode()
        channel.basic_publish(
            "", stack.names.jobs_queue, body, pika.BasicProperties(delivery_mode=2)
        )
        # Requeue until the quorum queue's delivery limit dead-letters it.
        while (got := channel.basic_get(stack.names.jobs_queue))[0] is not None:
            channel.basic_nack(got[0].delivery_tag, requeue=True)
    finally:
        conn.close()
    _wait_ready(stack, stack.names.dlq, 1)

    listing = run_cli("dlq", "list", env=stack.env())
    [row] = _rows(listing.stdout)
    assert row[1:4] == ["j-poison", "broker:", "delivery_limit"]
    assert row[0].startswith("sha256:")  # published without a message id
    shown, _ = _shown(run_cli("dlq", "show", row[0], env=stack.env()).stdout)
    assert "x-death" in shown["application_headers"]

    assert run_cli("dlq", "replay", "--all", env=stack.env()).returncode == 0
    [(properties, replayed)] = take_all(stack, stack.names.jobs_queue)
    assert replayed == body
    assert _without_delivery_count(properties.headers) == {}
    assert _ready(stack, stack.names.dlq) == 0


def test_a_slow_reader_of_a_long_list_does_not_cost_the_connection(stack: Stack) -> None:
    """More lines than a pipe holds, read only after several heartbeat timeouts: the list
    was fetched and the connection closed before the first line went out."""
    count = 1500  # some 150 KB of lines: more than a 64 KiB pipe takes before it blocks
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for n in range(count):
            body = json.dumps({"job_id": f"j-{n}", "request": {}}).encode()
            channel.basic_publish(
                "", stack.names.dlq, body, pika.BasicProperties(message_id=f"m-{n}")
            )
    finally:
        conn.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "dlq", "list", "--limit", str(count)],
        cwd=REPO,
        env=stack.env(heartbeat=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    # Output has begun (the pipe fills, the writer blocks); the broker gives up on a
    # client silent for about 2 heartbeats.
    readable, _, _ = select.select([process.stdout], [], [], 60)
    assert readable, "dlq list wrote nothing"
    time.sleep(6)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert [row[0] for row in _rows(stdout)] == [f"m-{n}" for n in range(count)]
    assert _ready(stack, stack.names.dlq) == count


def test_replay_of_nothing_exits_1(stack: Stack) -> None:
    result = run_cli("dlq", "replay", "--all", env=stack.env())
    assert result.returncode == 1
    assert "nothing to replay" in result.stderr


def test_purge_needs_yes(stack: Stack, rejected: list[tuple[str, dict[str, Any]]]) -> None:
    refused = run_cli("dlq", "purge", env=stack.env())
    assert refused.returncode == 1
    assert "holds 2 message(s); pass --yes" in refused.stdout
    assert _ready(stack, stack.names.dlq) == 2

    purged = run_cli("dlq", "purge", "--yes", env=stack.env())
    assert purged.returncode == 0, purged.stderr
    assert "dropped 2 message(s)" in purged.stdout
    assert _ready(stack, stack.names.dlq) == 0
    assert run_cli("dlq", "list", env=stack.env()).stdout.strip().endswith("is empty")


def test_a_missing_dlq_is_one_line_and_exit_1(stack: Stack) -> None:
    result = run_cli("dlq", "list", env=stack.env(dlq=f"absent-{uuid.uuid4().hex[:6]}"))
    assert result.returncode == 1
    assert result.stderr.startswith("batch-worker: dlq list: ")
    assert "NOT_FOUND" in result.stderr
    assert "Traceback" not in result.stderr


def _publish_to_dlq(stack: Stack, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Straight into the DLQ, confirmed, as dead-lettering would leave them."""
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for body, properties in messages:
            channel.basic_publish(
                "", stack.names.dlq, body, pika.BasicProperties(delivery_mode=2, **properties)
            )
    finally:
        conn.close()


@broker
def test_a_listed_id_names_that_message_after_the_dlq_reordered(
    stack: Stack, rejected: list[tuple[str, dict[str, Any]]]
) -> None:
    """`list --limit 1` returns the first message to the back of the quorum queue: the id
    it printed still shows, replays and drops that message, not whatever is first now."""
    [listed] = [
        row[0] for row in _rows(run_cli("dlq", "list", "--limit", "1", env=stack.env()).stdout)[:1]
    ]
    assert listed == rejected[0][0]
    shown = run_cli("dlq", "show", listed, env=stack.env())
    assert shown.returncode == 0, shown.stderr
    assert _shown(shown.stdout)[0]["message_id"] == listed

    dropped = run_cli("dlq", "drop", listed, env=stack.env())
    assert dropped.returncode == 0, dropped.stderr
    assert f"dropped 1 message(s) '{listed}'" in dropped.stdout
    assert [row[0] for row in _rows(run_cli("dlq", "list", env=stack.env()).stdout)] == [
        rejected[1][0]
    ]
    again = run_cli("dlq", "drop", listed, env=stack.env())
    assert again.returncode == 1
    assert f"no dead-lettered message '{listed}'" in again.stderr
    assert _ready(stack, stack.names.dlq) == 1


@broker
def test_messages_without_an_id_are_named_by_a_digest_that_holds(stack: Stack) -> None:
    """Two bodies alike but for a header, and neither with a message id: each has a digest
    of its own, the same on every look (the broker's x-delivery-count is left out), and
    replay and drop take exactly that one."""
    body = json.dumps({"job_id": "j-noid", "request": {}}).encode()
    _publish_to_dlq(stack, [(body, {"headers": {"n": 1}}), (body, {"headers": {"n": 2}})])
    looks = [_rows(run_cli("dlq", "list", env=stack.env()).stdout) for _ in range(3)]
    keys = [sorted(row[0] for row in look) for look in looks]
    assert keys[0] == keys[1] == keys[2]
    first, second = keys[0]
    assert first != second and first.startswith("sha256:") and len(first) == len("sha256:") + 16

    shown = {key: _shown(run_cli("dlq", "show", key, env=stack.env()).stdout)[0] for key in keys[0]}
    assert sorted(p["application_headers"]["n"] for p in shown.values()) == [1, 2]

    replay = run_cli("dlq", "replay", first, env=stack.env())
    assert replay.returncode == 0, replay.stderr
    [(properties, replayed)] = take_all(stack, stack.names.jobs_queue)
    assert replayed == body
    assert properties.headers["n"] == shown[first]["application_headers"]["n"]
    assert run_cli("dlq", "drop", second, env=stack.env()).returncode == 0
    assert _ready(stack, stack.names.dlq) == 0


@broker
def test_thirty_looks_lose_no_dead_letter(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each `dlq list` returns every message it looked at, and each return counts as a
    delivery: RabbitMQ 4's default limit of 20 dropped them all by the 21st look. The DLQ
    the worker declares keeps them on any version. In-process runs of the command (a
    process each would cost a second or more apiece here, for the same code path)."""
    from worker import cli

    ids = [f"m-{n}" for n in range(3)]
    _publish_to_dlq(stack, [(b"{bad", {"message_id": i}) for i in ids])
    for key, value in stack.env().items():
        if key.startswith("BATCH_WORKER_"):
            monkeypatch.setenv(key, value)
    for look in range(30):
        assert cli.main(["dlq", "list"]) == 0
        listed = sorted(row[0] for row in _rows(capsys.readouterr().out))
        assert listed == ids, f"look {look + 1}: {listed}"
    assert _ready(stack, stack.names.dlq) == 3
