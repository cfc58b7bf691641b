"""``batch-worker demo``: the whole product on one machine, live.

It brings up a local S3 server (moto) and the Batch V2 simulator, runs the worker daemon
against them (RabbitMQ and PostgreSQL must be reachable: `make demo` starts local ones when
none is), publishes the example jobs (the seed examples, one stopped UNHEALTHY that
resumes, and one stopped by its cost forecast) as any producer would (pika, confirms,
`mandatory`), and follows their events with a progress bar per job until every job has
ended. Everything goes through production code: the same daemon, the same S3 reader, real
AMQP.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console

from worker.commands.follow import EventFollower, JobTracker
from worker.commands.render import describe, print_summary, progress_bars, show
from worker.settings import Settings

log = logging.getLogger(__name__)

# The example jobs are package data, so an installed `batch-worker demo` has them too.
EXAMPLES = resources.files("worker") / "examples"
DEMO_BUCKET = "demo-bucket"
# One database per run (dropped at its end), so demos on one server never share job state.
DEMO_DATABASE_PREFIX = "batch_worker_demo_"
# The longest example (66 features) takes about 1,600 API seconds: under a minute at x30.
DEFAULT_SPEED = 30.0
# The resume example waits out the restart block: the simulator's is cut to 300 API seconds
# (10 s at x30) so the demo shows it at the simulator's speed, and the worker waits a
# little longer than that, as a deployment's RESTART_BLOCK would.
DEMO_RESTART_BLOCK = 300.0
DEMO_RESTART_MARGIN = 1.0
EXIT_INTERRUPTED = 130


def _broker_problem(settings: Settings) -> str | None:
    """None when the broker takes a connection, else one line naming what was tried."""
    from worker.broker import broker_problem, connection
    from worker.commands.follow import BROKER_ERRORS

    try:
        with connection(settings, purpose="demo check") as conn:
            conn.ensure_connection(max_retries=1)
    except BROKER_ERRORS as exc:
        return broker_problem(settings.broker_url.get_secret_value(), exc)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))  # as the demo's probe server binds
        except OSError:
            return False
        return True


_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


@contextmanager
def s3_emulator() -> Iterator[str]:
    """An S3 endpoint (moto's server) on loopback, set as this process's AWS_* for boto3
    while it runs (the demo's; the tests' too); the AWS_* there were are put back."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in _AWS_VARIABLES}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",  # noqa: S106 - the emulator accepts any key
        AWS_DEFAULT_REGION="eu-central-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _prepare_bucket(endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(
        Bucket=DEMO_BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
    )
    for entry in EXAMPLES.iterdir():
        if entry.name.endswith(".gpkg"):
            s3.put_object(Bucket=DEMO_BUCKET, Key=f"inputs/{entry.name}", Body=entry.read_bytes())


@contextmanager
def _demo_database(server_url: str) -> Iterator[str]:
    """A new database for this run's job state; dropped when the demo ends."""
    import psycopg

    name = f"{DEMO_DATABASE_PREFIX}{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _example_jobs() -> list[dict[str, Any]]:
    jobs = []
    for entry in sorted(EXAMPLES.iterdir(), key=lambda entry: entry.name):
        if not entry.name.endswith(".json"):
            continue
        job = json.loads(entry.read_text(encoding="utf-8"))
        if isinstance(job, dict) and "job_id" in job:
            jobs.append(job)
    return jobs


def _pika_parameters(url: str) -> Any:
    """pika reads kombu's ``//`` (the default vhost) as vhost ``""``: spell it ``/%2F``."""
    import pika

    return pika.URLParameters(url[:-2] + "/%2F" if url.endswith("//") else url)


def _publish(broker_url: str, queue: str, jobs: list[dict[str, Any]]) -> None:
    import pika

    connection = pika.BlockingConnection(_pika_parameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for job in jobs:
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=json.dumps(job).encode(),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=str(uuid.uuid4()),
                    correlation_id=job["job_id"],
                ),
                mandatory=True,
            )
    finally:
        connection.close()


def run_demo(
    base: Settings,
    *,
    speed: float | None = None,
    keep_going: bool = False,
    stay: bool | None = None,
) -> int:
    """Run the demo to its end: 0 when every example job has ended, 2 when RabbitMQ or
    PostgreSQL is not usable, 130 on Ctrl-C before then (everything it started is stopped).

    Once the jobs have ended, the status page stays up until Ctrl-C when ``stay`` (by
    default: when run on a terminal) or ``keep_going``; otherwise the demo ends at once.
    """
    if stay is None:
        stay = sys.stdin.isatty() and sys.stdout.isatty()
    from worker.logs import setup_logging
    from worker.store.db import probe

    console = Console()
    problems = []
    broker = _broker_problem(base)
    if broker is not None:
        problems.append(f"{broker} (BATCH_WORKER_BROKER_URL)")
    database = probe(base.database_url.get_secret_value())
    if database is not None:
        problems.append(f"{database} (BATCH_WORKER_DATABASE_URL)")
    if problems:
        for problem in problems:
            console.print(f"demo: {problem}", style="red", markup=False, highlight=False)
        console.print("`make demo` starts local ones when none is reachable.", markup=False)
        return 2

    log_path = Path("demo-output") / "worker.log"
    log_path.parent.mkdir(exist_ok=True)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        with log_path.open("w") as log_stream:
            setup_logging(
                base.log_level,
                "json",
                stream=log_stream,
                wire=base.log_wire,
                fields={"worker": base.worker_name},
            )
            return _run(console, base, speed or DEFAULT_SPEED, keep_going or stay, log_path)
    except KeyboardInterrupt:
        console.print("demo: interrupted; everything it started has stopped")
        return EXIT_INTERRUPTED
    finally:
        # The log file is closed: give the caller its logging back.
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(saved_level)


def _metrics_port(console: Console, wanted: int, what: str = "metrics") -> int:
    if _port_is_free(wanted):
        return wanted
    port = _free_port()
    console.print(f"port {wanted} is taken: {what} on port {port} instead")
    return port


def _run(console: Console, base: Settings, speed: float, keep_going: bool, log_path: Path) -> int:
    from worker.daemon.supervisor import Daemon
    from worker.simulator import SimulatorConfig, start_background

    broker_url = base.broker_url.get_secret_value()
    with s3_emulator() as s3_endpoint:
        _prepare_bucket(s3_endpoint)
        console.print(f"S3 emulator (moto) at {s3_endpoint}, bucket {DEMO_BUCKET}")
        simulator_config = SimulatorConfig(
            speed=speed,
            restart_block=DEMO_RESTART_BLOCK,
            client_id="demo-client",
            client_secret="demo-secret",  # noqa: S106 - the simulator's own demo client
        )
        with (
            start_background(simulator_config) as simulator,
            _demo_database(base.database_url.get_secret_value()) as database_url,
        ):
            console.print(f"Batch V2 simulator at {simulator.url}")
            database = urlsplit(database_url).path.lstrip("/")
            console.print(f"job state in PostgreSQL database {database} (dropped at the end)")
            settings = base.model_copy(
                update={
                    "api_url": simulator.url,
                    "token_url": simulator.token_url,
                    "client_id": "demo-client",
                    "client_secret": type(base.client_secret)("demo-secret"),
                    "database_url": type(base.database_url)(database_url),
                    "fleet_id": "demo",
                    "poll_interval": 2.0,
                    "restart_block": simulator_config.scaled(DEMO_RESTART_BLOCK)
                    + DEMO_RESTART_MARGIN,
                    "restart_jitter": DEMO_RESTART_MARGIN,
                    # A demo's probe server is for this machine only.
                    "metrics_host": IPv4Address("127.0.0.1"),
                    "metrics_port": _metrics_port(console, base.metrics_port),
                }
            )
            daemon = Daemon(settings)
            thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
            thread.start()
            console.print(
                f"worker running: metrics on http://127.0.0.1:{settings.metrics_port}/metrics,"
                f" logs in {log_path}"
            )
            try:
                with _status_page(console, settings) as page:
                    return _follow(console, settings, broker_url, keep_going, page)
            finally:
                daemon.stop()
                thread.join(settings.grace_period + 5)


@contextmanager
def _status_page(console: Console, settings: Settings) -> Iterator[str]:
    """``batch-worker web`` on this machine's loopback for the demo's run."""
    from worker.web.server import WebServer

    web = settings.model_copy(
        update={
            "web_host": IPv4Address("127.0.0.1"),
            "web_port": _metrics_port(console, settings.web_port, "the status page"),
        }
    )
    with WebServer(web) as server:
        console.print(f"status page: {server.url} (the API under /api/v1)", highlight=False)
        yield server.url


def _follow(
    console: Console, settings: Settings, broker_url: str, keep_going: bool, page: str
) -> int:
    jobs = _example_jobs()
    tracker = JobTracker([job["job_id"] for job in jobs])
    _wait_for_topology(broker_url, settings)
    follower = EventFollower(
        settings, tracker, on_note=lambda text: console.print(text, markup=False)
    )
    try:
        _publish(broker_url, settings.jobs_queue, jobs)
        console.print(f"published {len(jobs)} job requests to {settings.jobs_queue} (pika)")
        with progress_bars(console) as progress:
            bars = {
                job_id: progress.add_task(describe(view), total=100)
                for job_id, view in tracker.views.items()
            }
            while not all(view.finished for view in tracker.views.values()):
                follower.drain(0.5)
                show(progress, bars, tracker)
        print_summary(console, tracker, "batch-worker demo", json_lines=False)
        if keep_going:
            console.print(
                f"all jobs ended; the status page stays up at {page}: press Ctrl-C to stop",
                highlight=False,
            )
            try:
                while True:
                    follower.drain(1.0)
            except KeyboardInterrupt:
                return 0
        return 0
    finally:
        follower.close()


def _wait_for_topology(broker_url: str, settings: Settings, timeout: float = 60.0) -> None:
    """The daemon declares its topology as it starts; publish only once it exists."""
    import pika
    import pika.exceptions

    deadline = time.monotonic() + timeout
    while True:
        connection = pika.BlockingConnection(_pika_parameters(broker_url))
        try:
            channel = connection.channel()
            channel.queue_declare(settings.jobs_queue, passive=True)
            channel.exchange_declare(settings.events_exchange, passive=True)
            return
        except pika.exceptions.ChannelClosedByBroker:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            if connection.is_open:
                connection.close()
