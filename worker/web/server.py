"""Running the status API: in the foreground (``batch-worker web``) or on a thread of its own
(the demo, the tests).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import TracebackType

from aiohttp import web

from worker.redact import register_secret
from worker.settings import Settings
from worker.store import db
from worker.web.app import build_app
from worker.web.features import FeatureReader

log = logging.getLogger(__name__)


def register_web_secrets(settings: Settings) -> None:
    register_secret(settings.web_token.get_secret_value())
    for token in settings.web_tenant_tokens.values():
        register_secret(token.get_secret_value())
    basic = settings.web_basic_auth.get_secret_value()
    if basic:
        register_secret(basic.partition(":")[2])


class WebServer:
    """The API on a background thread: ``start`` returns once it listens (or raises
    OSError for an address it cannot take), ``stop`` closes it."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None):
        self.settings = settings
        self.host = host if host is not None else str(settings.web_host)
        self.port = port if port is not None else settings.web_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="web", daemon=True)
        self._runner: web.AppRunner | None = None
        self._pool: db.Pool | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host
        return f"http://{shown}:{self.port}/"

    def start(self) -> WebServer:
        register_web_secrets(self.settings)
        self._pool = db.open_pool(self.settings, min_size=1, max_size=4)
        app = build_app(self.settings, self._pool, FeatureReader())
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(app), self._loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        if self._thread.is_alive():
            # The threads database and S3 reads ran on go with it.
            done = asyncio.run_coroutine_threadsafe(
                self._loop.shutdown_default_executor(), self._loop
            )
            done.result(30)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(settings: Settings) -> int:
    """``batch-worker web``: serve until SIGTERM or SIGINT, then close and return 0."""
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    with WebServer(settings) as server:
        log.info("status API and pages at %s", server.url, extra={"url": server.url})
        stopped.wait()
    return 0
