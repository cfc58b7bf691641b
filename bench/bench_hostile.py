"""The hostile-input campaign, longer than CI's: generated job requests, AMQP properties and
headers (tests/e2e/hostile.py) published to a running worker, batch after batch, each
checked as tests/e2e/test_hostile.py checks CI's four: accepted, or rejected with its
byte-for-byte dead letter; never INTERNAL_ERROR; intake never stalled.

    PYTHONPATH=. python bench/bench_hostile.py [--batches 40]

Runs that test with more batches (25 messages each) against the shared RabbitMQ and
PostgreSQL (names and a scratch database of its own), the simulator and an S3 emulator,
then prints the figures: messages tried, outcomes by rejection code, time, and the worker's
resident memory after each batch. Exits with the test's status. docs/reliability.md has
the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches of 25 messages")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "hostile.json"
        env = dict(
            os.environ,
            BATCH_WORKER_TEST_HOSTILE_BATCHES=str(args.batches),
            BATCH_WORKER_TEST_HOSTILE_REPORT=str(report),
        )
        test = "tests/e2e/test_hostile.py"
        run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
        status = subprocess.run(run, cwd=REPO, env=env, check=False).returncode
        if not report.exists():
            print("the campaign wrote no figures", file=sys.stderr)
            return status or 1
        figures = json.loads(report.read_text())
    memory = figures.pop("worker_memory_kib")
    print(json.dumps(figures, indent=2))
    if memory:
        rss = [m["VmRSS"] // 1024 for m in memory]
        print(
            f"worker RSS (MiB) after the first batch {rss[0]}, the last {rss[-1]},"
            f" highest {max(rss)}; peak {memory[-1]['VmHWM'] // 1024}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
