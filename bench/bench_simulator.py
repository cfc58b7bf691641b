"""How many authenticated GETs a second the simulator answers (it must never be the bottleneck).

The simulator runs in its own process (``serve``, as ``batch-worker simulate`` does); this
process is the client: aiohttp with many concurrent requests over keep-alive connections.
Three endpoints side by side, in one run:

- baseline: ``GET /admin/config`` (no auth, no job logic: the HTTP stack alone)
- ``GET /api/v2/batch/process/{id}`` (auth, rate limit and fault checks, one task)
- ``GET /api/v2/batch/process?count=100`` (a full list page)

    python bench/bench_simulator.py [--seconds 5] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import requests

ROOT = Path(__file__).resolve().parents[1]
SERVER = (
    "import sys; from worker.simulator import SimulatorConfig, serve; "
    "serve(SimulatorConfig(history=300, requests_per_minute=0, write_artifacts=False),"
    " host='127.0.0.1', port=int(sys.argv[1]))"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str) -> None:
    for _ in range(100):
        try:
            requests.get(url + "/admin/config", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("the simulator did not come up")


async def hammer(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> float:
    """Requests per second over ``seconds`` with ``concurrency`` requests in flight."""
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        stop_at = time.perf_counter() + seconds

        async def one_client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{url} answered {response.status}")
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return done / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(base)
        token = requests.post(
            base + "/auth/realms/main/protocol/openid-connect/token",
            data={"grant_type": "client_credentials", "client_id": "b", "client_secret": "b"},
            timeout=5,
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        api = base + "/api/v2/batch"
        task_id = requests.get(api + "/process?count=1", headers=headers, timeout=5).json()["data"][
            0
        ]["id"]
        cases = [
            ("baseline GET /admin/config", base + "/admin/config"),
            ("GET /process/{id}", f"{api}/process/{task_id}"),
            ("GET /process?count=100", api + "/process?count=100"),
        ]
        print(f"{args.concurrency} concurrent requests, {args.seconds:g} s each")
        for name, url in cases:
            rate = asyncio.run(hammer(url, headers, args.seconds, args.concurrency))
            print(f"{name:32s} {rate:9.0f} requests/s")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
