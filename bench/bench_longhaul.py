"""The long haul: three workers, hundreds of jobs, a worker SIGKILLed at random every few
seconds (and a new one started), a broker restart and a PostgreSQL restart in the middle.

Everything is the bench's own: a RabbitMQ node (tests/rabbitmq_node.py) and a PostgreSQL
cluster (initdb into a temporary folder, on ports of their own; the shared services on
5672 and 5432 are never touched), the simulator, a moto S3 server. At the end: every
accepted job must have exactly one terminal event and one batch request in the simulator.

After each kill it prints, in seconds from the kill: when the killed worker's mark was gone,
when a peer ran out its leases, when the last of its jobs was claimed by another and when
the last was stepped again; at the end p50 / p95 / max of the time each held job took to be
stepped again (the target: 5 s at p95).

    PYTHONPATH=. .venv/bin/python bench/bench_longhaul.py --jobs 300 --kill-every 5
    PYTHONPATH=. .venv/bin/python bench/bench_longhaul.py --baseline origin/main

With ``--baseline REF`` the same run (same seed, same services) is made first with the
workers of REF (``git archive`` into a temporary folder), then with today's, each with a
database and queues of its own, and both printed side by side.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pika
from baseline import export
from longhaul_parts import (
    EventLog,
    PgCluster,
    Takeover,
    held_by,
    percentile,
    watch_takeover,
)
from moto.server import ThreadedMotoServer

from tests.conftest import AmqpNames, pika_parameters
from tests.e2e.conftest import EXAMPLES, FAST, Stack, WorkerProcess, free_port
from tests.rabbitmq_node import RabbitNode
from worker.broker import connection, declare_topology
from worker.lifecycle import tag_for
from worker.simulator import SimulatorConfig, start_background

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class TreeWorker(WorkerProcess):
    """A worker process importing the ``worker`` package of another tree (the baseline)."""

    def __init__(self, env: dict[str, str], log_path: Path, tree: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )


@dataclass
class Outcome:
    jobs: int = 0
    once: int = 0
    never: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    requests_off: dict[str, int] = field(default_factory=dict)
    kills: list[Takeover] = field(default_factory=list)
    started: int = 0
    wall: float = 0.0
    pg_restart_at: int | None = None  # jobs ended when PostgreSQL was restarted
    broker_restart_at: int | None = None

    @property
    def ok(self) -> bool:
        return not self.never and not self.twice and not self.requests_off


@dataclass
class Services:
    pg: PgCluster
    rabbit: RabbitNode
    sim: Any
    bucket: str
    root: Path


def run_variant(
    label: str, tree: Path | None, services: Services, args: argparse.Namespace
) -> Outcome:
    dice = random.Random(args.seed)
    database = services.pg.create_database(f"bw_{label}")
    names = AmqpNames(f"lh{label[:4]}{uuid.uuid4().hex[:6]}")
    fleet = names.settings()["fleet_id"]
    root = services.root / label
    root.mkdir()
    stack = Stack(services.rabbit.url, database, names, services.sim, services.bucket, root)
    with connection(stack.settings(), purpose="bench") as conn:
        declare_topology(conn, stack.settings())
    events = EventLog(services.rabbit.url, names.events_exchange)
    events.pump()
    out = Outcome(jobs=args.jobs)
    workers: list[WorkerProcess] = []
    worker_names: dict[int, str] = {}

    def start_one() -> WorkerProcess:
        name = f"lh-{label}-{len(workers)}"
        log = root / f"{name}.log"
        env = stack.env(log_level="INFO", worker_name=name)
        worker = TreeWorker(env, log, tree) if tree else WorkerProcess(env, log)
        workers.append(worker)
        worker_names[id(worker)] = name
        return worker

    try:
        alive = [start_one() for _ in range(args.workers)]
        jobs = [stack.payload("max-ndvi-geotiff.json", features=2) for _ in range(args.jobs)]
        ids = [j["job_id"] for j in jobs]
        conn = pika.BlockingConnection(pika_parameters(services.rabbit.url))
        channel = conn.channel()
        channel.confirm_delivery()
        for job in jobs:
            body = json.dumps(job).encode()
            props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
            channel.basic_publish("", names.jobs_queue, body, props, mandatory=True)
        conn.close()
        say(f"{label}: {args.jobs} jobs published, {args.workers} workers")
        # (Both restarts happen, by halfway at the latest: the run waits for them.)
        started = time.monotonic()
        broker_done = pg_done = args.no_restarts
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
                services.rabbit.stop()
                time.sleep(2)
                services.rabbit.start()
                broker_done = True
                out.broker_restart_at = ended
                pg_at = time.monotonic() + 15  # events may come in a rush after it
            elif broker_done and not pg_done and (ended >= len(ids) // 2 or now > pg_at):
                say(f"{ended} ended: restarting PostgreSQL")
                services.pg.restart()
                pg_done = True
                out.pg_restart_at = ended
            elif now >= next_kill:
                victim = alive.pop(dice.randrange(len(alive)))
                name = worker_names[id(victim)]
                victim.signal(signal.SIGSTOP)  # what it holds, read before the kill
                held = held_by(database, fleet, name)
                victim.kill()
                killed = time.monotonic()
                alive.append(start_one())
                if held:
                    seen = watch_takeover(database, fleet, name, held, killed)
                    out.kills.append(seen)
                    say(f"{ended} ended: killed {name} holding {len(held)}: {describe(seen)}")
                    if args.keep:
                        say(f"  claimed {seen.claimed}\n  stepped {seen.stepped}")
                else:
                    say(f"{ended} ended: killed {name} holding none")
                next_kill = time.monotonic() + args.kill_every
            time.sleep(0.2)
        events.pump()
        tags = {tag_for(fleet, j): j for j in ids}
        per_job: dict[str, int] = dict.fromkeys(ids, 0)
        for task in stack.upstream_requests():
            text = task["request"].get("description") or ""
            for tag, job_id in tags.items():
                if tag in text:
                    per_job[job_id] += 1
        out.once = sum(1 for j in ids if len(events.terminal.get(j, ())) == 1)
        out.never = [j for j in ids if j not in events.terminal]
        out.twice = [j for j in ids if len(events.terminal.get(j, ())) > 1]
        out.requests_off = {j: n for j, n in per_job.items() if n != 1}
        out.wall = time.monotonic() - started
        out.started = len(workers) - args.workers
    finally:
        for worker in workers:
            worker.stop()
    return out


def describe(seen: Takeover) -> str:
    def at(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    claimed = max(seen.claimed.values()) if seen.claimed else None
    stepped = max(seen.stepped.values()) if seen.stepped else None
    missing = seen.held - len(seen.stepped)
    return (
        f"mark gone {at(seen.lock_gone)} s, leases run out {at(seen.reaped)} s,"
        f" last claimed {at(claimed)} s, last stepped {at(stepped)} s"
        + (f" ({missing} NOT stepped in time)" if missing else "")
    )


def report(label: str, out: Outcome) -> list[str]:
    per_job = [t for k in out.kills for t in k.stepped.values()]
    claims = [t for k in out.kills for t in k.claimed.values()]
    marks = [k.lock_gone for k in out.kills if k.lock_gone is not None]
    reaped = [k.reaped for k in out.kills if k.reaped is not None]

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        return (
            f"{statistics.median(values):.2f} / {percentile(values, 0.95):.2f}"
            f" / {max(values):.2f} s"
        )

    held = sum(k.held for k in out.kills)
    late = held - len(per_job)
    return [
        f"[{label}]",
        f"jobs        {out.jobs} accepted, {out.once} with exactly one terminal event",
        f"lost        {len(out.never)} without one; {len(out.twice)} with more than one",
        f"requests    {len(out.requests_off)} jobs without exactly one batch request"
        f" {out.requests_off or ''}",
        f"restarts    broker at {out.broker_restart_at} ended, PostgreSQL at"
        f" {out.pg_restart_at} ended",
        f"kills       {len(out.kills)} with jobs in hand (of {out.started}), {held} jobs held"
        + (f", {late} not stepped again within 120 s" if late else ""),
        f"mark gone   p50 / p95 / max {spread(marks)}",
        f"run out     p50 / p95 / max {spread(reaped)}",
        f"claimed     p50 / p95 / max {spread(claims)}  (per job)",
        f"stepped     p50 / p95 / max {spread(per_job)}  (per job: the recovery time)",
        f"wall        {out.wall:.0f} s",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--speed", type=float, default=60.0, help="simulator speed")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per API call")
    parser.add_argument("--settle", type=float, default=600.0, help="longest wait for the end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", help="also run the workers of this commit, first")
    parser.add_argument("--no-restarts", action="store_true", help="kills only")
    parser.add_argument("--keep", action="store_true", help="keep the workers' logs")
    args = parser.parse_args()
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
    config = SimulatorConfig(**{**FAST, "speed": args.speed, "latency": args.latency})
    outcomes: dict[str, Outcome] = {}
    try:
        with start_background(config) as sim:
            services = Services(pg, rabbit, sim, bucket, root)
            variants: list[tuple[str, Path | None]] = [("today", None)]
            if args.baseline:
                variants.insert(0, ("baseline", export(args.baseline, root)))
            for label, tree in variants:
                outcomes[label] = run_variant(label, tree, services, args)
    finally:
        rabbit.stop()
        pg.stop()
        s3.stop()
        for folder in (
            (pg.data.parent, rabbit_base) if args.keep else (root, pg.data.parent, rabbit_base)
        ):
            shutil.rmtree(folder, ignore_errors=True)
        if args.keep:
            print(f"the workers' logs: {root}")
    print()
    if args.baseline:
        print(f"(baseline: {args.baseline})")
    for label, out in outcomes.items():
        print("\n".join(report(label, out)))
    return 0 if all(out.ok for out in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
