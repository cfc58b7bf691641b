"""The long haul: three workers, hundreds of jobs, a worker SIGKILLed at random every few
seconds (and a new one started), a broker restart and a PostgreSQL restart in the middle.

Everything is the bench's own: a RabbitMQ node (tests/rabbitmq_node.py) and a PostgreSQL
cluster (initdb into a temporary folder, on ports of their own; the shared services on
5672 and 5432 are never touched), the simulator, a moto S3 server. At the end: every
accepted job must have exactly one terminal event and one batch request in the simulator.
Prints the recovery time after each kill: from the kill until every job the killed worker
held was claimed again by another.

    PYTHONPATH=. .venv/bin/python bench/bench_longhaul.py --jobs 300 --kill-every 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pika
import pika.exceptions
import psycopg
from moto.server import ThreadedMotoServer

from tests.conftest import AmqpNames, pika_parameters
from tests.e2e.conftest import EXAMPLES, FAST, Stack, WorkerProcess, free_port
from tests.rabbitmq_node import RabbitNode
from worker.broker import connection, declare_topology
from worker.lifecycle import tag_for
from worker.simulator import SimulatorConfig, start_background
from worker.store import db

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TERMINAL = {"DONE", "FAILED", "STOPPED"}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class PgCluster:
    """A PostgreSQL cluster of the bench's own (trust auth, loopback, its own port)."""

    def __init__(self, base: Path) -> None:
        self.data = base / "pgdata"
        self.port = free_port()
        self.log = base / "pg.log"
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")  # initdb refuses to run as root
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [
                *self._as,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [
                *self._as,
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                *args,
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")


class EventLog:
    """Every event, from a durable queue of the bench's own: it outlives a broker restart."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange
        self.queue = f"bench-events-{uuid.uuid4().hex[:6]}"
        self.terminal: dict[str, set[str]] = {}
        self._conn: pika.BlockingConnection | None = None

    def pump(self) -> None:
        try:
            if self._conn is None or not self._conn.is_open:
                self._conn = pika.BlockingConnection(pika_parameters(self.url))
                ch = self._conn.channel()
                ch.queue_declare(self.queue, durable=True)
                ch.queue_bind(self.queue, self.exchange, routing_key="#")
            ch = self._conn.channel()
            while True:
                method, _props, body = ch.basic_get(self.queue, auto_ack=True)
                if method is None:
                    break
                event = json.loads(body)
                if (
                    event["type"] == "batchworker.job.status"
                    and event["data"]["status"] in TERMINAL
                ):
                    self.terminal.setdefault(event["subject"], set()).add(event["id"])
            ch.close()
        except (pika.exceptions.AMQPError, OSError):
            self._conn = None  # the broker is restarting: read again later


def leases_of(database_url: str, fleet: str, owner: str) -> dict[str, int]:
    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT job_id, generation FROM bw_jobs WHERE fleet_id = %s AND lease_owner = %s",
                (fleet, owner),
            ).fetchall()
    except psycopg.Error:
        return {}
    return {r[0]: r[1] for r in rows}


def taken_over(database_url: str, fleet: str, held: dict[str, int], owner: str) -> bool:
    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT job_id, generation, lease_owner FROM bw_jobs"
                " WHERE fleet_id = %s AND job_id = ANY(%s)",
                (fleet, list(held)),
            ).fetchall()
    except psycopg.Error:
        return False
    return all(gen > held[job] and who != owner for job, gen, who in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--speed", type=float, default=60.0, help="simulator speed")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per API call")
    parser.add_argument("--settle", type=float, default=600.0, help="longest wait for the end")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    dice = random.Random(args.seed)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bw-longhaul-"))
    root.chmod(0o755)  # the nodes run as their own users
    pg = PgCluster(Path(tempfile.mkdtemp(prefix="bw-longhaul-pg-")))
    pg.start()
    rabbit_base = Path(tempfile.mkdtemp(prefix="bw-longhaul-rabbit-"))
    if os.geteuid() == 0:
        shutil.chown(rabbit_base, "rabbitmq", "rabbitmq")
    rabbit = RabbitNode(rabbit_base)
    rabbit.start()
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="eu-central-1",
    )
    bucket = "demo-bucket"
    client = boto3.client("s3")
    client.create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
    )
    for gpkg in EXAMPLES.glob("*.gpkg"):
        client.upload_file(str(gpkg), bucket, f"inputs/{gpkg.name}")
    names = AmqpNames(f"lh{uuid.uuid4().hex[:6]}")
    fleet = names.settings()["fleet_id"]
    config = SimulatorConfig(**{**FAST, "speed": args.speed, "latency": args.latency})
    workers: list[WorkerProcess] = []
    recoveries: list[float] = []
    try:
        with start_background(config) as sim:
            stack = Stack(rabbit.url, pg.url, names, sim, bucket, root)
            with psycopg.connect(pg.url) as conn:
                db.apply_schema(conn)
            with connection(stack.settings(), purpose="bench") as conn:
                declare_topology(conn, stack.settings())
            events = EventLog(rabbit.url, names.events_exchange)
            events.pump()

            worker_names: dict[int, str] = {}

            def start_one() -> WorkerProcess:
                name = f"lh-worker-{len(workers)}"
                log = root / f"{name}.log"
                worker = WorkerProcess(stack.env(log_level="INFO", worker_name=name), log)
                workers.append(worker)
                worker_names[id(worker)] = name
                return worker

            alive = [start_one() for _ in range(args.workers)]
            jobs = [stack.payload("max-ndvi-geotiff.json", features=2) for _ in range(args.jobs)]
            ids = [j["job_id"] for j in jobs]
            params = pika_parameters(rabbit.url)
            conn = pika.BlockingConnection(params)
            channel = conn.channel()
            channel.confirm_delivery()
            for job in jobs:
                body = json.dumps(job).encode()
                props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
                channel.basic_publish("", names.jobs_queue, body, props, mandatory=True)
            conn.close()
            say(f"{args.jobs} jobs published, {args.workers} workers")
            # (Both restarts happen, by halfway at the latest: the run waits for them.)
            started = time.monotonic()
            broker_done = pg_done = False
            pg_at = float("inf")
            next_kill = started + args.kill_every
            while time.monotonic() < started + args.settle:
                events.pump()
                ended = sum(1 for j in ids if j in events.terminal)
                if ended == len(ids) and pg_done:
                    break
                now = time.monotonic()
                if not broker_done and ended >= len(ids) // 4:
                    say(f"{ended} ended: restarting the broker")
                    rabbit.stop()
                    time.sleep(2)
                    rabbit.start()
                    broker_done = True
                    pg_at = time.monotonic() + 15  # events may come in a rush after it
                elif broker_done and not pg_done and (ended >= len(ids) // 2 or now > pg_at):
                    say(f"{ended} ended: restarting PostgreSQL")
                    pg.restart()
                    pg_done = True
                elif now >= next_kill:
                    next_kill = now + args.kill_every
                    victim = alive.pop(dice.randrange(len(alive)))
                    name = worker_names[id(victim)]
                    victim.signal(signal.SIGSTOP)  # what it holds, read before the kill
                    held = leases_of(pg.url, fleet, name)
                    victim.kill()
                    killed = time.monotonic()
                    alive.append(start_one())
                    while held and not taken_over(pg.url, fleet, held, name):
                        if time.monotonic() > killed + 120:
                            say(f"  {name}'s jobs were not taken over in 120 s")
                            break
                        time.sleep(0.05)
                    else:
                        if held:
                            recoveries.append(time.monotonic() - killed)
                    say(
                        f"{ended} ended: killed {name} holding {len(held)} jobs"
                        + (f", taken over in {recoveries[-1]:.2f} s" if held and recoveries else "")
                    )
                time.sleep(0.2)
            events.pump()
            tags = {tag_for(fleet, j): j for j in ids}
            per_job: dict[str, int] = dict.fromkeys(ids, 0)
            for task in stack.upstream_requests():
                text = task["request"].get("description") or ""
                for tag, job_id in tags.items():
                    if tag in text:
                        per_job[job_id] += 1
            once = sum(1 for j in ids if len(events.terminal.get(j, ())) == 1)
            never = [j for j in ids if j not in events.terminal]
            twice = [j for j in ids if len(events.terminal.get(j, ())) > 1]
            requests_off = {j: n for j, n in per_job.items() if n != 1}
            wall = time.monotonic() - started
    finally:
        for worker in workers:
            worker.stop()
        rabbit.stop()
        pg.stop()
        s3.stop()
        for folder in (root, pg.data.parent, rabbit_base):
            shutil.rmtree(folder, ignore_errors=True)
    print(f"jobs        {len(ids)} accepted, {once} with exactly one terminal event")
    print(f"lost        {len(never)} without one; {len(twice)} with more than one")
    print(f"requests    {len(requests_off)} jobs without exactly one batch request {requests_off}")
    print(f"kills       {len(recoveries)} with jobs in hand (of {len(workers) - args.workers})")
    if recoveries:
        ordered = sorted(recoveries)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        print(
            f"recovery    p50 {statistics.median(ordered):.2f} s, p95 {p95:.2f} s,"
            f" max {ordered[-1]:.2f} s"
        )
    print(f"wall        {wall:.0f} s")
    return 0 if not never and not twice and not requests_off else 1


if __name__ == "__main__":
    sys.exit(main())
