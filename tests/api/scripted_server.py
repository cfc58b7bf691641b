"""A scripted Batch V2 server on loopback (stdlib ThreadingHTTPServer in a thread).

Tests queue replies per (method, path); the token endpoint issues tokens by itself and
the batch endpoints check them. Every request is recorded for assertions.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN_PATH = "/auth/realms/main/protocol/openid-connect/token"
BATCH_PREFIX = "/api/v2/batch"


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes/str
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (to provoke client timeouts)
    drop: bool = False  # close the connection without answering


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode())


def error_body(status: int, code: str, message: str, *, wrapped: bool = True) -> dict[str, Any]:
    inner = {"status": status, "reason": "Error", "message": message, "code": code}
    return {"error": inner} if wrapped else inner


def task_body(task_id: str, status: str = "CREATED", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task_id,
        "request": {"description": f"task {task_id}"},
        "status": status,
        "userAction": "NONE",
        "created": "2026-11-25T21:30:00.123456Z",
        "lastUpdated": "2026-11-25T21:30:00.123456Z",
        "completionPercentage": 0,
        "costPU": 0.0,
    }
    body.update(extra)
    return body


class ScriptedServer:
    def __init__(self, *, token_lifetime: float = 3600.0) -> None:
        self.token_lifetime = token_lifetime
        self.token_delay = 0.0  # seconds the token endpoint takes to answer
        self.client_id = "client-id"
        self.client_secret = "sEcReT-Value-42"
        self.requests: list[Seen] = []
        self.issued: list[str] = []
        self.token_replies: deque[Reply] = deque()
        self._valid_tokens: set[str] = set()
        self._script: dict[tuple[str, str], deque[Reply]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # --- life ----------------------------------------------------------------------------

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def batch_url(self) -> str:
        return self.base + BATCH_PREFIX

    @property
    def token_url(self) -> str:
        return self.base + TOKEN_PATH

    # --- scripting ---------------------------------------------------------------------

    def on(self, method: str, path: str, *replies: Reply) -> None:
        """Queue replies for METHOD path (relative to /api/v2/batch), consumed in order."""
        with self._lock:
            self._script.setdefault((method, BATCH_PREFIX + path), deque()).extend(replies)

    def revoke_tokens(self) -> None:
        with self._lock:
            self._valid_tokens.clear()

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        full = None if path is None else TOKEN_PATH if path == "token" else BATCH_PREFIX + path
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (full is None or r.path == full)
            ]

    @property
    def token_requests(self) -> list[Seen]:
        return self.seen("POST", "token")

    # --- answering -------------------------------------------------------------------

    def answer(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            if seen.path == TOKEN_PATH:
                return self._token(seen)
            auth = seen.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self._valid_tokens:
                return Reply(401, error_body(401, "COMMON_UNAUTHORIZED", "token not valid"))
            queue = self._script.get((seen.method, seen.path))
            if not queue:
                return Reply(599, error_body(599, "UNSCRIPTED", f"{seen.method} {seen.path}"))
            return queue.popleft()

    def _token(self, seen: Seen) -> Reply:
        if self.token_replies:
            return self.token_replies.popleft()
        form = seen.form
        if form.get("client_secret") != [self.client_secret] or form.get("client_id") != [
            self.client_id
        ]:
            return Reply(
                401,
                {"error": "unauthorized_client", "error_description": "Invalid client credentials"},
            )
        token = f"tok-{len(self.issued) + 1}-{time.monotonic_ns()}"
        self.issued.append(token)
        self._valid_tokens.add(token)
        return Reply(
            200,
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"},
            delay=self.token_delay,
        )


def _handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out as two writes; without this, Nagle + delayed ACK
            # add 40 ms to every keep-alive request.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            path = re.sub(r"/+$", "", parts.path) or "/"
            seen = Seen(
                method=self.command,
                path=path,
                query=parse_qs(parts.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                at=time.monotonic(),
            )
            reply = server.answer(seen)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                self.connection.close()
                return
            if isinstance(reply.body, bytes):
                payload = reply.body
            elif isinstance(reply.body, str):
                payload = reply.body.encode()
            elif reply.body is None:
                payload = b""
            else:
                payload = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            if payload and not isinstance(reply.body, bytes | str):
                self.send_header("Content-Type", "application/json")
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler
