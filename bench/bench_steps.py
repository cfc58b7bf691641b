"""The engine's cost per step, today's tree against another commit's, side by side in one run.

A step here is what the status loop does thousands of times an hour: a job in PROCESSING is
claimed, its new completion folded in by the lifecycle, a status event written to the
outbox, the job saved and released (``Engine.drive``, the real code, on a real PostgreSQL;
the API is not called: the status was "read" already, and a tile read answers at once from
memory, so the figures are the engine's and the database's, not S3's).

    PYTHONPATH=. python bench/bench_steps.py --baseline HEAD~1 [--jobs 200] [--steps 3000]

The baseline commit is exported (``git archive``) into a temporary folder; each round runs
both trees, one after the other in alternating order, each in a fresh process importing
its own ``worker`` package, against a scratch database of its own. Printed per tree: the
worker process's CPU per 1,000 steps (user + system), wall time per 1,000 steps, and
PostgreSQL transactions per step (``pg_stat_database``); the median of the rounds and the
ratio of today's to the baseline's. No pass/fail (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from baseline import export

ROOT = Path(__file__).resolve().parent.parent
BATCH = 50  # jobs claimed at once
SERVER = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _child(jobs_count: int, steps: int) -> dict[str, Any]:
    """Runs in a process of its own, importing whichever ``worker`` PYTHONPATH names."""
    import psycopg

    from worker import lifecycle
    from worker.daemon.engine import Engine
    from worker.lifecycle import JobState, Phase, TaskSnapshot, Tiles
    from worker.lifecycle.observations import TaskSeen
    from worker.settings import Settings
    from worker.store import db, jobs, leases

    if os.environ.get("BENCH_STEPS_HISTORY") == "off":
        # Today's save without its history insert (--history-cost): what keeping events
        # for the status API adds, from the same tree.
        from worker.store import history

        kept = f"{history.record_queued('queued')}\n        RETURNING 1"
        assert kept in leases._SAVE, "the save's history insert moved: update the bench"
        leases._SAVE = leases._SAVE.replace(kept, "SELECT 1 WHERE false")

    name = f"bench_steps_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = SERVER.rsplit("/", 1)[0] + f"/{name}"
    try:
        settings = Settings(database_url=url, fleet_id="bench")
        pool = db.open_pool(url, min_size=2, max_size=4)
        db.ensure_schema(pool)
        t0 = datetime.now(UTC)
        request = {
            "description": "bench",
            "output": {"delivery": {"s3": {"url": "s3://bench/out"}}},
        }
        states = [
            JobState(
                job_id=f"job-{i:05d}",
                fleet_id="bench",
                request_hash="h",
                request=request,
                accepted_at=t0,
                phase=Phase.TRACKING,
                batch_request_id=str(uuid.uuid4()),
                upstream_created=t0,
                status="PROCESSING",
                upstream_status="PROCESSING",
                furthest_rank=lifecycle.STATUS_RANK["PROCESSING"],
                completion=1.0,
                cost_pu=10.0,
                tiles=Tiles(total=100, processed=1),
                sequence=5,
            )
            for i in range(jobs_count)
        ]
        with pool.connection() as conn:
            jobs.insert_jobs(conn, [jobs.job_row(s) for s in states], next_run_at=t0)

        class Tiles1:
            def read(self, request: dict[str, Any], request_id: str, *, execution_db: bool) -> Any:
                return Tiles(total=100, processed=50)

            def cost_bound(self, request_id: str) -> float | None:
                return None  # asked since the cost guard (f7530cc); older trees never ask

        engine = Engine(settings, pool, client=None, tiles=Tiles1(), worker_name="bench")  # type: ignore[arg-type]

        def xacts() -> int:
            with psycopg.connect(SERVER, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                    (name,),
                ).fetchone()
            return int(row[0]) if row else 0

        def server_cpu() -> dict[int, float]:
            """CPU seconds of each server process of the scratch database (this machine's)."""
            with psycopg.connect(SERVER, autocommit=True) as conn:
                pids = [
                    int(pid)
                    for (pid,) in conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
                    ).fetchall()
                ]
            found = {}
            for pid in pids:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # another machine's server, or gone
                found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            return found

        ids = [s.job_id for s in states]
        done = 0
        before_x = xacts()
        server0 = server_cpu()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.perf_counter()
        while done < steps:
            # Claimed in batches, as the status loop claims the jobs whose status moved.
            batch = [ids[(done + k) % len(ids)] for k in range(min(BATCH, steps - done))]
            with pool.connection() as conn:
                claims = leases.claim_due(
                    conn,
                    "bench",
                    "bench",
                    now=datetime.now(UTC),
                    lease=timedelta(seconds=60),
                    limit=len(batch),
                    job_ids=batch,
                )
            for claim in claims:
                completion = min(99.0, claim.state.completion + 0.01)
                task = TaskSnapshot(
                    id=claim.state.batch_request_id or "",
                    status="PROCESSING",
                    created=t0,
                    completion_percentage=completion,
                    cost_pu=10.0 + completion,
                )
                engine.drive(claim, [TaskSeen(task)])
                done += 1
        wall = time.perf_counter() - wall0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        server1 = server_cpu()
        server = sum(cpu - server0.get(pid, 0.0) for pid, cpu in server1.items())
        # pg_stat_database is updated when a backend reports, which it does at idle: close first.
        pool.close()
        time.sleep(1.0)
        after_x = xacts()
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        with psycopg.connect(url, autocommit=True) as conn:
            events = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
        return {
            "cpu_ms_per_1000": cpu / steps * 1e6,
            "wall_ms_per_1000": wall / steps * 1e6,
            "server_cpu_ms_per_1000": server / steps * 1e6,
            "xacts_per_step": (after_x - before_x) / steps,
            "events": int(events[0]) if events else 0,
        }
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(tree: Path, jobs_count: int, steps: int, history: bool = True) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if not history:
        env["BENCH_STEPS_HISTORY"] = "off"
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--jobs", str(jobs_count), "--steps", str(steps)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD~1", help="the commit to compare with")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--history-cost",
        action="store_true",
        help="also run today's tree without the event history insert, and print its cost",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.jobs, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-steps-") as tmp:
        trees = {"baseline": export(args.baseline, Path(tmp)), "today": ROOT}
        if args.history_cost:
            trees["no-history"] = ROOT
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for round_no in range(args.rounds):
            order = list(trees) if round_no % 2 == 0 else list(reversed(trees))
            for name in order:
                result = _run(trees[name], args.jobs, args.steps, history=name != "no-history")
                results[name].append(result)
                print(f"round {round_no + 1} {name:<8} {json.dumps(result)}", flush=True)
    print(
        f"\n{args.steps} steps over {args.jobs} jobs, median of {args.rounds} rounds"
        f" (baseline {args.baseline}):"
    )
    print(
        f"{'':<10} {'CPU ms/1000':>12} {'server CPU':>11} {'wall ms/1000':>13}"
        f" {'xacts/step':>11} {'events/step':>12}"
    )
    medians: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        medians[name] = {
            key: statistics.median(r[key] for r in runs)
            for key in (
                "cpu_ms_per_1000",
                "server_cpu_ms_per_1000",
                "wall_ms_per_1000",
                "xacts_per_step",
                "events",
            )
        }
        m = medians[name]
        print(
            f"{name:<10} {m['cpu_ms_per_1000']:>12.0f} {m['server_cpu_ms_per_1000']:>11.0f}"
            f" {m['wall_ms_per_1000']:>13.0f} {m['xacts_per_step']:>11.2f}"
            f" {m['events'] / args.steps:>12.2f}"
        )
    ratio = {k: medians["today"][k] / medians["baseline"][k] for k in medians["today"]}
    print(
        f"{'ratio':<10} {ratio['cpu_ms_per_1000']:>12.2f} {ratio['server_cpu_ms_per_1000']:>11.2f}"
        f" {ratio['wall_ms_per_1000']:>13.2f} {ratio['xacts_per_step']:>11.2f}"
    )
    if args.history_cost:
        with_it, without = medians["today"], medians["no-history"]
        per_event = args.steps / with_it["events"] if with_it["events"] else float("nan")
        for key, label in (
            ("cpu_ms_per_1000", "CPU (worker)"),
            ("server_cpu_ms_per_1000", "CPU (PostgreSQL)"),
            ("wall_ms_per_1000", "wall"),
        ):
            extra = (with_it[key] - without[key]) / 1000  # ms per step
            print(
                f"the event history's {label}: {extra * 1000:+.0f} µs a step,"
                f" {extra * 1000 * per_event:+.0f} µs an event"
                f" ({with_it[key] / without[key] - 1:+.1%})"
            )


if __name__ == "__main__":
    main()
