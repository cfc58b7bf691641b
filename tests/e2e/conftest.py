"""The whole product under test: worker processes (``python -m worker run``) against a real
RabbitMQ, a real PostgreSQL, the simulator over HTTP and the moto S3 server.

Producers and event readers here are written with pika, not with the worker's kombu: any
AMQP client must interoperate.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pika
import pika.exceptions
import pytest

from tests.conftest import AmqpNames, pika_parameters
from worker.broker import connection, declare_topology
from worker.settings import Settings
from worker.simulator import Running, SimulatorConfig, start_background

if TYPE_CHECKING:
    from worker.api.client import BatchClient

EXAMPLES = Path(__file__).resolve().parents[2] / "worker" / "examples"
REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret-d41d8cd98f"
TERMINAL = {"DONE", "FAILED", "STOPPED"}

# Fast but faithful: a whole job takes a few seconds.
FAST = {
    "speed": 200.0,
    "history": 30,
    "requests_per_minute": 0,
    "client_id": CLIENT_ID,
    "client_secret": CLIENT_SECRET,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    broker_url: str
    database_url: str
    names: AmqpNames
    simulator: Running
    bucket: str
    tmp: Path

    def env(self, **overrides: Any) -> dict[str, str]:
        """The environment of one worker process."""
        values: dict[str, Any] = {
            "API_URL": self.simulator.url,
            "TOKEN_URL": self.simulator.token_url,
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "BROKER_URL": self.broker_url,
            "DATABASE_URL": self.database_url,
            "JOBS_QUEUE": self.names.jobs_queue,
            "DLQ": self.names.dlq,
            "EVENTS_EXCHANGE": self.names.events_exchange,
            "FLEET_ID": self.names.settings()["fleet_id"],
            "POLL_INTERVAL": "0.5",
            "REST_POLL_INTERVAL": "0.5",
            "ACTION_LAG": "2",
            "NOT_FOUND_WINDOW": "3",
            "LIST_LAG_WINDOW": "2",
            "LEASE_SECONDS": "5",
            "GRACE_PERIOD": "10",
            "HEARTBEAT": "5",
            "METRICS_PORT": str(free_port()),
            "API_BUDGET_PER_MINUTE": "6000",
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
        }
        values.update({k.upper(): v for k, v in overrides.items()})
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_WORKER_")}
        env.update({f"BATCH_WORKER_{k}": str(v) for k, v in values.items()})
        return env

    def settings(self) -> Settings:
        return Settings(
            broker_url=self.broker_url,
            database_url=self.database_url,
            **self.names.settings(),
        )

    def payload(self, name: str, *, features: int | None = None) -> dict[str, Any]:
        """An example job request, pointed at this test's bucket; ``features`` pins the
        simulator's feature count (and so the job's duration) with a description marker."""
        text = (EXAMPLES / name).read_text().replace("demo-bucket", self.bucket)
        job: dict[str, Any] = json.loads(text)
        job["job_id"] = f"{job['job_id']}-{uuid.uuid4().hex[:6]}"
        if features is not None:
            request = job["request"]
            request["description"] = f"{request.get('description', '')} [sim:features={features}]"
        return job

    def api_client(self) -> BatchClient:
        """A client of the simulator's API, as a producer or another tool would hold one."""
        from worker.api.client import BatchClient

        return BatchClient(
            batch_url=self.simulator.url + "/api/v2/batch",
            token_url=self.simulator.token_url,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
        )

    def upstream_requests(self) -> list[dict[str, Any]]:
        """Every batch request the simulator holds that this fleet created (by tag-free scan:
        the worker's own description suffix is what we look for)."""
        with self.api_client() as client:
            return [task.model_dump(by_alias=True) for task in client.iter_requests()]


@pytest.fixture
def simulator() -> Iterator[Running]:
    with start_background(SimulatorConfig(**FAST)) as running:
        yield running


@pytest.fixture
def stack(
    broker_url: str,
    database_url: str,
    amqp_names: AmqpNames,
    simulator: Running,
    s3_bucket: str,
    tmp_path: Path,
) -> Stack:
    s3 = boto3.client("s3")
    for gpkg in EXAMPLES.glob("*.gpkg"):
        s3.upload_file(str(gpkg), s3_bucket, f"inputs/{gpkg.name}")
    stack = Stack(broker_url, database_url, amqp_names, simulator, s3_bucket, tmp_path)
    # Declared before any worker starts so the test's event queue can bind at once.
    with connection(stack.settings(), purpose="test") as conn:
        declare_topology(conn, stack.settings())
    return stack


class WorkerProcess:
    """``python -m worker run`` as a real process: signals are real signals."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(stack: Stack) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(**overrides: Any) -> WorkerProcess:
        log_path = stack.tmp / f"worker-{len(workers)}.log"
        worker = WorkerProcess(stack.env(**overrides), log_path)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@dataclass
class Events:
    """Every event published while the test runs, read with pika from a private queue."""

    connection: pika.BlockingConnection
    queue: str
    received: list[dict[str, Any]] = field(default_factory=list)
    properties: list[pika.BasicProperties] = field(default_factory=list)

    def pump(self, seconds: float = 0.2) -> None:
        self.connection.process_data_events(time_limit=seconds)

    def _on_message(self, ch: Any, method: Any, properties: Any, body: bytes) -> None:
        self.received.append(json.loads(body))
        self.properties.append(properties)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; events: {self.summary()}")
            self.pump(0.2)

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, de-duplicated as the contract tells consumers to."""
        seen: set[str] = set()
        last_sequence = 0
        kept = []
        for event in self.received:
            if event.get("subject") != job_id or event["id"] in seen:
                continue
            seen.add(event["id"])
            sequence = event["data"].get("sequence")
            if event["type"].startswith("batchworker.job."):
                if sequence <= last_sequence:
                    continue
                last_sequence = sequence
            kept.append(event)
        return kept

    def statuses(self, job_id: str) -> list[str]:
        return [
            e["data"]["status"]
            for e in self.for_job(job_id)
            if e["type"] == "batchworker.job.status"
        ]

    def terminal(self, job_id: str) -> dict[str, Any] | None:
        for event in self.for_job(job_id):
            if event["type"] == "batchworker.job.status" and event["data"]["status"] in TERMINAL:
                return event
        return None

    def wait_terminal(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        self.wait_for(lambda: self.terminal(job_id) is not None, timeout, f"{job_id} to end")
        event = self.terminal(job_id)
        assert event is not None
        return event

    def of_type(self, kind: str, job_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.received
            if e["type"] == f"batchworker.{kind}" and (job_id is None or e.get("subject") == job_id)
        ]

    def summary(self) -> list[tuple[str, str, Any]]:
        return [
            (e.get("subject"), e["type"].rsplit(".", 1)[-1], e["data"].get("status"))
            for e in self.received[-30:]
        ]


def read_events(stack: Stack) -> Events:
    """A private queue bound to every routing key of the events exchange."""
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, stack.names.events_exchange, routing_key="#")
    reader = Events(conn, queue)
    channel.basic_consume(queue, reader._on_message, auto_ack=True)
    return reader


@pytest.fixture
def events(stack: Stack) -> Iterator[Events]:
    reader = read_events(stack)
    yield reader
    if reader.connection.is_open:  # a broker restart in the test may have taken it already
        with contextlib.suppress(pika.exceptions.AMQPError):
            reader.connection.close()


@dataclass
class Producer:
    """A plain pika producer, as the README tells producers to publish."""

    broker_url: str
    queue: str

    def publish(
        self,
        body: dict[str, Any] | bytes,
        *,
        content_type: str | None = "application/json",
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> pika.BasicProperties:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        props = pika.BasicProperties(
            content_type=content_type,
            delivery_mode=2,
            message_id=properties.pop("message_id", str(uuid.uuid4())),
            headers=headers,
            **properties,
        )
        conn = pika.BlockingConnection(pika_parameters(self.broker_url))
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            channel.basic_publish("", self.queue, data, props, mandatory=True)
        finally:
            conn.close()
        return props


@pytest.fixture
def producer(stack: Stack) -> Producer:
    return Producer(stack.broker_url, stack.names.jobs_queue)


def take_all(stack: Stack, queue: str) -> list[tuple[Any, bytes]]:
    """Every message waiting in ``queue`` (taken off it)."""
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    try:
        channel = conn.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))
    finally:
        conn.close()


def dlq_messages(stack: Stack) -> list[tuple[Any, bytes]]:
    """Every message in the DLQ (taken off it)."""
    return take_all(stack, stack.names.dlq)
