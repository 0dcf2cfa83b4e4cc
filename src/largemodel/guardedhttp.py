"""A stdlib HTTP server whose connections cannot be held open (issue 14, defect 6).

The metrics ports of rank pods and of the operator serve `/healthz`, `/readyz` and `/metrics` to
kubelet probes and Prometheus, and must keep answering them while a scanner or a slow client
holds connections: every read times out, every connection has a deadline, and past a cap new
connections are closed at once. Standard library only, so both halves (and the torch-free
operator image) use the same one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

METRICS_READ_TIMEOUT_S = 5.0
METRICS_CONNECTION_S = 10.0
METRICS_MAX_CONNECTIONS = 32


class GuardedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose connections cannot be held open: each read times out after
    `read_timeout_s`, each connection is shut down `connection_s` after it was accepted, and
    past `max_connections` concurrent connections new ones are closed at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, read_timeout_s: float = METRICS_READ_TIMEOUT_S,
                 connection_s: float = METRICS_CONNECTION_S, max_connections: int = METRICS_MAX_CONNECTIONS) -> None:
        super().__init__(address, handler)
        self.read_timeout_s = read_timeout_s
        self.connection_s = connection_s
        self.max_connections = max_connections
        self._open: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._reaper = threading.Thread(target=self._reap, name="http-reaper", daemon=True)
        self._reaper.start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection while fewer than max_connections are open."""
        with self._lock:
            if len(self._open) >= self.max_connections:
                return False
            self._open[request] = time.monotonic() + self.connection_s
        request.settimeout(self.read_timeout_s)
        return True

    def shutdown_request(self, request: Any) -> None:
        """Forget the connection as it closes."""
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def _reap(self) -> None:
        while True:
            time.sleep(min(1.0, self.connection_s / 4))
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, deadline in self._open.items() if now > deadline]
            for sock in late:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the handler thread's read fails and it closes
