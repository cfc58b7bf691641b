"""Serving the simulator: in a background thread (tests, the demo) or blocking (the CLI)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import TracebackType
from typing import Any

from aiohttp import web

from worker.simulator.config import SimulatorConfig
from worker.simulator.server import TOKEN_PATH, build_app
from worker.simulator.service import Simulator

logger = logging.getLogger(__name__)


class Running:
    """A simulator serving in a background thread; stop it (or leave its ``with``) to end."""

    url: str
    token_url: str

    def __init__(self, config: SimulatorConfig, host: str, port: int) -> None:
        self._config = config
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._simulator: Simulator | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="batch-simulator", daemon=True)

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError(f"the simulator did not start: {self._failure}") from self._failure

    @property
    def simulator(self) -> Simulator:
        assert self._simulator is not None
        return self._simulator

    def configure(self, **changes: Any) -> None:
        """Change settings at run time, like ``PATCH /admin/config``; validated as a whole."""
        future = asyncio.run_coroutine_threadsafe(self._configure(changes), self._loop)
        future.result()

    async def _configure(self, changes: dict[str, Any]) -> None:
        self.simulator.configure(changes)

    def stop(self) -> None:
        if self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()

    def __enter__(self) -> Running:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        try:
            self._simulator = Simulator(self._config)
            runner, port = await _open(self._simulator, self._host, self._port)
        except Exception as exc:  # noqa: BLE001 - reported to the starting thread
            self._failure = exc
            self._ready.set()
            return
        self.url = f"http://{self._host}:{port}"
        self.token_url = self.url + TOKEN_PATH
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await runner.cleanup()
            await self._simulator.close()


async def _open(sim: Simulator, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(sim), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    sim.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)


def start_background(
    config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Running:
    """Serve a simulator from a daemon thread; returns once it accepts connections."""
    running = Running(config or SimulatorConfig(), host, port)
    running._start()
    return running


def serve(config: SimulatorConfig, *, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM (for ``batch-worker simulate``)."""
    asyncio.run(_serve_forever(config, host, port))


async def _serve_forever(config: SimulatorConfig, host: str, port: int) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    sim = Simulator(config)
    runner, bound = await _open(sim, host, port)
    logger.info(
        "Batch V2 simulator on http://%s:%d (API under /api/v2/batch, speed x%g)",
        host,
        bound,
        config.speed,
    )
    try:
        await stopped.wait()
    finally:
        logger.info("simulator stopping")
        await runner.cleanup()
        await sim.close()
