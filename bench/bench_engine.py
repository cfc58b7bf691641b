"""One Engine and its StatusLoop driving N jobs against the simulator (a separate process),
within a budget.

Prints: peak RSS of this process (the engine, its pools and threads; the simulator runs
apart), API requests per job, status change -> event latency (the event's ``time`` against when
the simulator first answered the status to a reader, "from shown", and against the
transition's scheduled time, "from scheduled": the simulator holds a status back until its
artifact is uploaded, and that hold is the simulator's, not the engine's; between them,
"from answerable": the later of the scheduled time and the hold's release), and the requests
per job the official SDK's monitoring would make at its defaults for the same job timelines
(``monitor_batch_process_job``: a GET every 10 s while CREATED/ANALYSING, every 120 s
after; plus create and start).

    PYTHONPATH=. python bench/bench_engine.py --jobs 1000 [--speed 1] [--budget 600]

Jobs go in through the store (as intake writes them) in one transaction. Every lifecycle
timing scales with ``--speed`` like the simulator's job durations (poll 30 s / speed, and
so on), so at speed 1 the figures are the production ones; the request budget does not
scale (it is the account's, per real minute). Tile reads are off unless ``--tiles``: then an
S3 emulator (moto's server, a process of its own) holds the delivery bucket, the simulator
writes each job's feature manifest and execution database there, and the engine reads them
with the daemon's ``TileReader`` (conditional GETs, as in production). Needs PostgreSQL at
BATCH_WORKER_TEST_DATABASE_URL (a scratch database is created and dropped). No pass/fail:
it prints figures (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from worker import lifecycle
from worker.api.budget import RequestBudget
from worker.api.client import ApiHooks, BatchClient
from worker.daemon.engine import Engine
from worker.daemon.status_loop import SWEEP_EVERY_POLLS, StatusLoop
from worker.daemon.supervisor import tune_gc
from worker.daemon.tiles import TileReader
from worker.lifecycle import Tiles
from worker.settings import Settings
from worker.simulator.server import TOKEN_PATH
from worker.store import db, jobs

PG_URL = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
FLEET = "bench"
BUCKET = "bench-bucket"
# A small Corsica tile: one or two features of the 60 m grid, so analysis is about 61 API s
# and processing about 140-160 API s (the simulator's duration model).
PAYLOAD: dict[str, Any] = {
    "processRequest": {
        "input": {
            "bounds": {"bbox": [9.0, 42.0, 9.05, 42.05]},
            "data": [{"type": "sentinel-2-l2a"}],
        },
        "output": {"responses": [{"identifier": "default", "format": {"type": "image/tiff"}}]},
        "evalscript": "//VERSION=3\nfunction setup() {}\nfunction evaluatePixel(s) {}",
    },
    "input": {"type": "tiling-grid", "id": 0, "resolution": 60.0},
    "output": {
        "type": "raster",
        "delivery": {"s3": {"url": "s3://bench-bucket/out", "iamRoleARN": "arn:aws:iam::1:role/r"}},
    },
    "description": "bench job",
}
SDK_ANALYSIS_SLEEP, SDK_SLEEP = 10.0, 120.0


class NoTiles:
    def read(self, request: dict[str, Any], request_id: str, *, execution_db: bool) -> Tiles | None:
        return None

    def cost_bound(self, request_id: str) -> float | None:
        return None


class TileMetrics:
    """The one metric the tile reader reports: reads by file and outcome."""

    reads: Counter[tuple[str, str]] = Counter()
    _lock = threading.Lock()

    def tile_read(self, file: str, outcome: str) -> None:
        with self._lock:
            self.reads[(file, outcome)] += 1


def start_s3(port: int) -> subprocess.Popen[bytes]:
    """moto's S3 server in a process of its own, so its memory and CPU are not the engine's."""
    code = (
        "import logging, sys, time\n"
        "from moto.server import ThreadedMotoServer\n"
        "logging.getLogger('werkzeug').setLevel(logging.WARNING)\n"
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
        "while True: time.sleep(3600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, process)
    return process


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"nothing listens on port {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scratch_database() -> tuple[str, str]:
    name = f"bw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(PG_URL)
    return name, urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(name: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_simulator(
    port: int,
    speed: float,
    state_file: Path,
    processing: float | None = None,
    *,
    artifacts: bool = False,
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "worker",
        "simulate",
        "--port",
        str(port),
        "--speed",
        str(speed),
        "--requests-per-minute",
        "0",
        "--history",
        "0",
        "--write-artifacts" if artifacts else "--no-write-artifacts",
        "--state-file",
        str(state_file),
    ]
    if processing is not None:
        command += ["--processing-base", str(processing)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    return process


def insert_jobs(pool: db.Pool, n: int) -> None:
    now = datetime.now(UTC)
    with pool.connection() as conn, conn.transaction():
        for i in range(n):
            state = lifecycle.new_job(
                job_id=f"bench-{i:05d}",  # the report finds them by these ids
                fleet_id=FLEET,
                request=PAYLOAD,
                adopt_id=None,
                request_hash="bench",
                auto_start=True,
                deadline=None,
                max_cost_pu=None,
                echo=lifecycle.Echo(),
                now=now,
            )
            jobs.insert_jobs(conn, [jobs.job_row(state)], next_run_at=now)


def vacuum(db_url: str) -> None:
    """What autovacuum does in production. Every step rewrites a job's row (few updates are
    HOT), and with autovacuum off (as on the machine these figures come from) bw_jobs held
    twelve dead row versions per live one midway through a 10,000-job run, and every status
    round's scans slowed down with it."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) bw_jobs")
        conn.execute("VACUUM bw_outbox")


def active_jobs(pool: db.Pool) -> int:
    with pool.connection() as conn:
        return sum(jobs.count_active_by_status(conn, FLEET).values())


def status_events(pool: db.Pool) -> dict[str, dict[str, datetime]]:
    """job id -> status -> time of its status event."""
    found: dict[str, dict[str, datetime]] = {}
    with pool.connection() as conn:
        for (body,) in conn.execute("SELECT body FROM bw_outbox ORDER BY id"):
            event = json.loads(bytes(body))
            if event.get("type") != "batchworker.job.status":
                continue
            at = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
            found.setdefault(event["subject"], {})[event["data"]["status"]] = at
    return found


def sdk_requests(phases: list[dict[str, Any]], created: float, speed: float) -> int:
    """Requests of create + start + monitor_batch_process_job at its defaults (API seconds)."""
    return 2 + len(sdk_reads(phases, created, speed))


def sdk_latencies(phases: list[dict[str, Any]], created: float, speed: float) -> list[float]:
    """API seconds from each status change to the SDK monitor's first read after it."""
    reads = sdk_reads(phases, created, speed)
    latencies = []
    for phase in phases:
        at = (phase["at"] - created) * speed
        after = [t for t in reads if t >= at]
        if after:
            latencies.append(after[0] - at)
    return latencies


def sdk_reads(phases: list[dict[str, Any]], created: float, speed: float) -> list[float]:
    """When (API seconds after the create) the SDK's monitor reads the status."""

    def status_at(api_seconds: float) -> str:
        current = "CREATED"
        for phase in phases:
            if (phase["at"] - created) * speed <= api_seconds:
                current = phase["status"]
        return current

    t, reads = 0.0, [0.0]
    while status_at(t) in ("CREATED", "ANALYSING"):
        t += SDK_ANALYSIS_SLEEP
        reads.append(t)
    while status_at(t) in ("ANALYSIS_DONE", "PROCESSING"):
        t += SDK_SLEEP
        reads.append(t)
    return reads


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


Row = tuple[str, str, float, float, float | None, float]
"""job id, status, when it was scheduled, when it could first be answered, when a reader
first got it (None: never), when its event was made: epoch seconds."""


def print_latency(name: str, values: list[float], speed: float) -> None:
    if values:
        p50, p95 = statistics.median(values), percentile(values, 0.95)
        print(
            f"status change -> event latency, from {name}: p50 {p50:.1f} s, p95 {p95:.1f} s "
            f"(x{speed:g} = API seconds: p50 {p50 * speed:.0f} s, p95 {p95 * speed:.0f} s; "
            f"{len(values)} transitions)"
        )


def print_breakdown(rows: list[Row], speed: float, t0: float) -> None:
    """Latency (API seconds) by status, and by when in the run the status showed: what a
    p95 is made of (the creates' crowding early on, a slow round later, ...)."""
    if not rows:
        return
    by_status: dict[str, list[float]] = {}
    from_answerable: dict[str, list[float]] = {}
    from_shown: dict[str, list[float]] = {}
    by_window: dict[int, list[float]] = {}
    window = 600.0 / speed  # ten API minutes
    for _, status, api_at, answerable_at, shown_at, event_at in rows:
        seconds = (event_at - api_at) * speed
        by_status.setdefault(status, []).append(seconds)
        from_answerable.setdefault(status, []).append((event_at - answerable_at) * speed)
        if shown_at is not None:
            from_shown.setdefault(status, []).append((event_at - shown_at) * speed)
        by_window.setdefault(int((api_at - t0) // window), []).append(seconds)
    print("  latency by status (API s), from shown | answerable | scheduled:")
    for status, values in sorted(by_status.items()):
        columns = (from_shown.get(status) or [math.nan], from_answerable[status], values)
        n, p50, p95, top = (
            " | ".join(f"{f(c):6.0f}" for c in columns)
            for f in (len, statistics.median, lambda c: percentile(c, 0.95), max)
        )
        print(f"    {status:14} n {n}  p50 {p50}  p95 {p95}  max {top}")
    print("  (by window below: from scheduled)")
    print(f"  latency by when the status showed ({window:g} s real windows from the start):")
    for index, values in sorted(by_window.items()):
        print(
            f"    {index * window:6.0f} s  n {len(values):6}  "
            f"p50 {statistics.median(values):6.0f}  p95 {percentile(values, 0.95):6.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--speed", type=float, default=1.0, help="simulator speed factor")
    parser.add_argument("--budget", type=int, default=600, help="API requests per minute")
    parser.add_argument("--threads", type=int, default=8, help="engine step threads")
    parser.add_argument("--timeout", type=float, default=7200.0, help="give up after (s)")
    parser.add_argument(
        "--vacuum",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vacuum the tables every 10 s, as autovacuum would (off on this machine)",
    )
    parser.add_argument(
        "--processing",
        type=float,
        help="API seconds of a job's processing (the simulator's processing base; default 120)",
    )
    parser.add_argument(
        "--freshness",
        type=float,
        default=120.0,
        help="PROGRESS_FRESHNESS in API seconds; 30 (the poll interval) reads on a fixed clock",
    )
    parser.add_argument(
        "--latencies",
        type=Path,
        help="write every transition (job, status, API time, event time, seconds) as CSV",
    )
    parser.add_argument(
        "--tiles",
        action="store_true",
        help="read tile counts from an S3 emulator the simulator writes the artifacts to",
    )
    parser.add_argument(
        "--sweeps",
        choices=("on", "off", "both"),
        default="on",
        help="duplicate sweeps; 'both' runs without then with them and prints their cost",
    )
    args = parser.parse_args()
    tune_gc()  # as the daemon does: its peak RSS is what this reports
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.sweeps]
    results: dict[bool, Counter[str]] = {}
    for sweeps in modes:
        print(f"== duplicate sweeps {'on' if sweeps else 'off'} ==", flush=True)
        results[sweeps] = run(args, sweeps=sweeps)
        print(flush=True)
    if len(results) == 2:
        off, on = results[False], results[True]
        print("duplicate sweeps, same jobs, one run (requests per job, token excluded):")
        for name in ("list", "get", "total"):
            a, b = off[name] / args.jobs, on[name] / args.jobs
            print(f"  {name:5}: off {a:6.2f}  on {b:6.2f}  extra {b - a:+.2f}")


def run(args: argparse.Namespace, *, sweeps: bool) -> Counter[str]:
    """One bench run; prints its figures and answers the status-read request counts."""
    speed = args.speed
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    state_file = tmp / "simulator.json"
    port = free_port()
    db_name, db_url = scratch_database()
    s3 = None
    tiles: Any = NoTiles()
    if args.tiles:
        s3_port = free_port()
        s3 = start_s3(s3_port)
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",  # the emulator takes any key
            AWS_DEFAULT_REGION="eu-central-1",
        )
        import boto3

        boto3.client("s3").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
        )
        tiles = TileReader(metrics=TileMetrics())
    simulator = start_simulator(port, speed, state_file, args.processing, artifacts=args.tiles)
    requests: Counter[str] = Counter()
    lock = threading.Lock()

    def on_request(endpoint: str, code: str, seconds: float) -> None:
        with lock:
            requests[endpoint] += 1

    settings = Settings(
        fleet_id=FLEET,
        events_exchange="bench.events",
        poll_interval=30.0 / speed,
        rest_poll_interval=600.0 / speed,
        progress_freshness=args.freshness / speed,
        action_lag=90.0 / speed,
        not_found_window=120.0 / speed,
        list_lag_window=60.0 / speed,
        lease_seconds=60.0,
        api_budget_per_minute=args.budget,
    )
    client = BatchClient(
        batch_url=f"http://127.0.0.1:{port}/api/v2/batch",
        token_url=f"http://127.0.0.1:{port}{TOKEN_PATH}",
        client_id="bench",
        client_secret="bench-secret",
        budget=RequestBudget(args.budget),
        hooks=ApiHooks(on_request=on_request),
    )
    pool = db.open_pool(db_url, max_size=args.threads * 2 + 4)
    try:
        db.ensure_schema(pool)
        started = time.monotonic()
        insert_jobs(pool, args.jobs)
        print(f"{args.jobs} jobs inserted in {time.monotonic() - started:.1f} s", flush=True)
        engine = Engine(
            settings,
            pool,
            client,
            tiles=tiles,
            worker_name="bench",
            threads=args.threads,
        )
        status = StatusLoop(
            settings,
            pool,
            client,
            engine,
            worker_name="bench",
            threads=args.threads,
            sweep_every_polls=SWEEP_EVERY_POLLS if sweeps else None,
        )
        loops = [
            threading.Thread(target=status.run, name="poller"),
            threading.Thread(target=engine.run, name="engine"),
        ]
        started, started_at = time.monotonic(), time.time()
        for thread in loops:
            thread.start()
        remaining = args.jobs
        while remaining and time.monotonic() - started < args.timeout:
            time.sleep(10)
            if args.vacuum:
                vacuum(db_url)
            remaining = active_jobs(pool)
            with lock:
                sent = sum(requests.values())
            elapsed = time.monotonic() - started
            print(f"  {elapsed:6.0f} s: {remaining} active, {sent} API requests", flush=True)
        elapsed = time.monotonic() - started
        status.request_stop()
        engine.request_stop()
        for thread in loops:
            thread.join()
        # Before the report reads every event into memory: the engine's peak, not ours.
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        events = status_events(pool)
        with pool.connection() as conn:
            outcomes = Counter(
                status for (status,) in conn.execute("SELECT status FROM bw_jobs").fetchall()
            )
    finally:
        pool.close()
        client.close()
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(60)
        if s3 is not None:
            s3.kill()
            s3.wait(60)
        drop_database(db_name)

    sim_jobs = json.loads(state_file.read_text())["jobs"]
    tag_to_job = {
        lifecycle.tag_for(FLEET, f"bench-{i:05d}"): f"bench-{i:05d}" for i in range(args.jobs)
    }
    latencies: list[float] = []
    shown_latencies: list[float] = []
    answerable_latencies: list[float] = []
    rows: list[Row] = []
    sdk: list[int] = []
    sdk_lag: list[float] = []
    for job in sim_jobs:
        words = (job["request"].get("description") or "").split()
        job_id = next((tag_to_job[w] for w in words if w in tag_to_job), None)
        if job_id is None:
            continue
        sdk.append(sdk_requests(job["phases"], job["created"], speed))
        sdk_lag += sdk_latencies(job["phases"], job["created"], speed)
        seen = events.get(job_id, {})
        for phase in job["phases"]:
            at = seen.get(phase["status"])
            if at is not None:
                shown = phase.get("shown")
                answerable = max(phase["at"], phase.get("released") or phase["at"])
                latencies.append(at.timestamp() - phase["at"])
                answerable_latencies.append(at.timestamp() - answerable)
                if shown is not None:
                    shown_latencies.append(at.timestamp() - shown)
                row = (job_id, phase["status"], phase["at"], answerable, shown, at.timestamp())
                rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    ended = args.jobs - remaining
    total = sum(requests.values()) - requests["token"]
    ours = total / args.jobs
    baseline = statistics.mean(sdk) if sdk else float("nan")
    print()
    print(
        f"jobs: {args.jobs} ({ended} ended: {dict(outcomes)}) in {elapsed:.0f} s; "
        f"speed x{speed:g}, "
        f"budget {args.budget}/min, poll {settings.poll_interval:g} s, "
        f"progress freshness {settings.progress_freshness:g} s"
    )
    print(f"peak RSS of the engine process: {rss_mb:.0f} MB")
    if args.tiles:
        print(f"tile reads (file, outcome): {dict(sorted(TileMetrics.reads.items()))}")
    print(f"API requests: {total} ({dict(requests)}), {ours:.2f} per job")
    print_latency("shown", shown_latencies, speed)
    print_latency("answerable", answerable_latencies, speed)
    print_latency("scheduled", latencies, speed)
    print(
        f"SDK monitoring at its defaults, same timelines: {baseline:.2f} requests per job; "
        f"ratio ours/SDK {ours / baseline:.3f}"
    )
    if sdk_lag:
        print(
            "SDK monitoring, same timelines: status change -> read latency "
            f"p50 {statistics.median(sdk_lag):.0f} s, p95 {percentile(sdk_lag, 0.95):.0f} s "
            f"(API seconds; {len(sdk_lag)} transitions)"
        )
    print_breakdown(rows, speed, started_at)
    if args.latencies is not None:
        with args.latencies.open("w", newline="") as out:
            writer = csv.writer(out)
            header = ["job", "status", "api_at", "answerable_at", "shown_at", "event_at"]
            writer.writerow([*header, "seconds"])
            writer.writerows((*row, f"{row[5] - row[2]:.3f}") for row in rows)
        print(f"transitions written to {args.latencies}")
    return Counter(list=requests["list"], get=requests["get"], total=total)


if __name__ == "__main__":
    main()
