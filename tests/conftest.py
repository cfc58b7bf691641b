"""Shared fixtures: the real services the integration tests talk to.

Every service fixture skips when the service is unreachable on a developer's machine, and
fails under CI (``CI`` set): a green CI run never hides a test that did not run.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

IN_CI = bool(os.environ.get("CI"))

BROKER_URL = os.environ.get("BATCH_WORKER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Set by `scripts/rabbitmq4.sh run` (make test's second broker run): BROKER_URL is then the
# RabbitMQ 4.0 node in that script's chroot, and its CLI is reached through the script.
RABBITMQ4_SCRIPT = os.environ.get("BATCH_WORKER_TEST_RABBITMQ4")
DATABASE_URL = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def rabbitmqctl(*args: str) -> list[str]:
    """The command line of ``rabbitmqctl ARGS`` for the tests' broker."""
    if RABBITMQ4_SCRIPT:
        return [RABBITMQ4_SCRIPT, "ctl", *args]
    return ["rabbitmqctl", *args]


def import_definitions(path: str) -> list[str]:
    """The command line that loads a definitions file into the tests' broker (a node in a
    chroot cannot read the host's file: the script copies it in)."""
    if RABBITMQ4_SCRIPT:
        return [RABBITMQ4_SCRIPT, "import", path]
    return ["rabbitmqctl", "import_definitions", path]


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> None:
    if _reachable(url, default_port):
        return
    message = f"{name} is not reachable at {urlsplit(url).netloc.split('@')[-1]}"
    if IN_CI:
        pytest.fail(message + " (CI must provide it: .ci/run starts it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def broker_url() -> str:
    require_service("RabbitMQ", BROKER_URL, 5672)
    return BROKER_URL


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    require_service("PostgreSQL", DATABASE_URL, 5432)
    return DATABASE_URL


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database per test, dropped afterwards."""
    import psycopg

    name = f"bw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(pg_server_url)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pool(database_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A connection pool on the fresh database, with the worker's schema in it, of four
    connections at the most, or of a module's ``POOL_SIZE`` (the engine's tests step jobs
    in threads of their own)."""
    from worker.store import db

    size = getattr(request.module, "POOL_SIZE", 4)
    pool = db.open_pool(database_url, min_size=1, max_size=size)
    db.ensure_schema(pool)
    yield pool
    pool.close()


@dataclass(frozen=True)
class AmqpNames:
    """Names no other test uses, so tests never see each other's messages."""

    prefix: str

    @property
    def jobs_queue(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.jobs.dlq"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    def settings(self) -> dict[str, Any]:
        return {
            "jobs_queue": self.jobs_queue,
            "dlq": self.dlq,
            "events_exchange": self.events_exchange,
            "fleet_id": self.prefix.replace(".", "-"),
        }


@pytest.fixture
def amqp_names(broker_url: str) -> Iterator[AmqpNames]:
    names = AmqpNames(prefix=f"t{uuid.uuid4().hex[:10]}")
    yield names
    _delete_topology(broker_url, names)


def pika_parameters(url: str) -> pika.URLParameters:
    """pika reads the path ``//`` (kombu's spelling of the default vhost) as vhost ``""``."""
    if url.endswith("//"):
        url = url[:-2] + "/%2F"
    return pika.URLParameters(url)


def _delete_topology(broker_url: str, names: AmqpNames) -> None:
    params = pika_parameters(broker_url)
    try:
        conn = pika.BlockingConnection(params)
    except Exception:
        return
    try:
        ch = conn.channel()
        for queue in (names.jobs_queue, names.dlq, f"{names.events_exchange}.unrouted"):
            ch.queue_delete(queue)
        for exchange in (names.events_exchange, f"{names.events_exchange}.unrouted"):
            ch.exchange_delete(exchange)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) on loopback, used through boto3."""
    from worker.commands.demo import s3_emulator

    # The emulator logs every request at INFO; that drowns a failing test's own log.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with s3_emulator() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket in the emulator."""
    import boto3

    name = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
    )
    return name
