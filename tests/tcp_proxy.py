"""A TCP proxy a test can pause (a path that blackholes packets) or cut (one that breaks)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class PausableProxy:
    """Forwards TCP to ``target``; while paused, reads nothing and forwards nothing.

    ``hold``: a client connection whose data starts with these bytes (an HTTP method, at the
    start of a request) is frozen there: that request is never forwarded, its connection
    stays open, and nothing more on it moves, while other connections carry on.
    """

    def __init__(self, target: tuple[str, int], *, hold: bytes | None = None) -> None:
        self._target = target
        self._hold = hold
        self.held = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.paused = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        with contextlib.suppress(OSError):
            while not self._closed.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)  # the bytes wait in the kernel's buffers
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is a and self._hold is not None and data.startswith(self._hold):
                        self.held.set()
                        return  # both sockets stay open (closed with the proxy)
                    peer[sock].sendall(data)

    def cut(self) -> None:
        """Close every connection made so far, as a broken network path or a restarting
        server would; new ones are still taken."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
