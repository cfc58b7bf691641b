"""The official SDK's own monitoring run for real against the simulator: N jobs, one thread
each (``create`` -> ``start_job`` -> ``monitor_batch_process_job`` at its default sleeps),
time compressed by ``--speed`` on both sides (the simulator's durations, the SDK's sleeps).

Prints the requests per job the simulator counted and status change -> read latency (API
seconds), to hold beside what bench/bench_engine.py computes for the SDK on its own jobs'
timelines ("SDK monitoring at its defaults, same timelines"): the same jobs, the same
factor, so the two SDK figures should agree.

    PYTHONPATH=. python bench/bench_sdk.py --jobs 10 --speed 60 --processing 3600
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.bench_engine import PAYLOAD, free_port, percentile, start_simulator
from worker.simulator.server import TOKEN_PATH


class CompressedTime:
    """Stands in for the ``time`` module inside the SDK's monitors: its sleeps last
    ``speed`` times shorter, as the simulator's durations do."""

    def __init__(self, speed: float) -> None:
        self.speed = speed

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.speed)


def stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/stats", timeout=10) as answer:
        counted: dict[str, int] = json.load(answer)["requests"]
        return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--speed", type=float, default=60.0, help="time factor, both sides")
    parser.add_argument("--processing", type=float, default=3600.0, help="API s of processing")
    args = parser.parse_args()
    os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the simulator is on loopback
    os.environ.setdefault("TQDM_DISABLE", "1")  # one progress bar per thread: noise here

    from sentinelhub import BatchProcessClient, SHConfig
    from sentinelhub.api.batch import utils as batch_utils

    batch_utils.time = CompressedTime(args.speed)  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    state_file = tmp / "simulator.json"
    port = free_port()
    simulator = start_simulator(port, args.speed, state_file, args.processing)
    reads: dict[str, list[float]] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def one_job(index: int) -> None:
        config = SHConfig(
            sh_base_url=f"http://127.0.0.1:{port}",
            sh_token_url=f"http://127.0.0.1:{port}{TOKEN_PATH}",
            sh_client_id="bench",
            sh_client_secret="bench-secret",
        )
        client = BatchProcessClient(config=config)
        original = client.get_request

        def get_request(request: Any) -> Any:
            answer = original(request)
            with lock:
                reads.setdefault(answer.request_id, []).append(time.time())
            return answer

        client.get_request = get_request  # type: ignore[method-assign]
        try:
            created = client.create(
                process_request=PAYLOAD["processRequest"],
                input=PAYLOAD["input"],
                output=PAYLOAD["output"],
                description=f"sdk bench job {index}",
            )
            with lock:
                reads.setdefault(created.request_id, []).append(time.time())
            client.start_job(created)
            batch_utils.monitor_batch_process_job(created, client)
        except BaseException as exc:  # noqa: BLE001 - reported with the figures
            failures.append(exc)

    try:
        before = stats(port)
        started = time.monotonic()
        threads = [threading.Thread(target=one_job, args=(i,)) for i in range(args.jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        after = stats(port)
    finally:
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(60)
    counted = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # Keyed "endpoint status"; the token is not an API request (bench_engine leaves it out).
    counted = {k: v for k, v in counted.items() if v and not k.startswith("token")}
    total = sum(counted.values())
    latencies: list[float] = []
    for job in json.loads(state_file.read_text())["jobs"]:
        times = sorted(reads.get(job["id"], []))
        for phase in job["phases"]:
            after_it = [t for t in times if t >= phase["at"]]
            if after_it:
                latencies.append((after_it[0] - phase["at"]) * args.speed)
    print(f"jobs: {args.jobs} in {elapsed:.0f} s; speed x{args.speed:g}; failures: {failures}")
    per_job = total / args.jobs
    print(f"SDK requests counted by the simulator: {total} ({counted}), {per_job:.2f} per job")
    if latencies:
        print(
            "SDK status change -> read latency: "
            f"p50 {statistics.median(latencies):.0f} s, p95 {percentile(latencies, 0.95):.0f} s "
            f"(API seconds; {len(latencies)} transitions)"
        )


if __name__ == "__main__":
    main()
