"""Read timeouts and size limits for every HTTP listener of a rank pod (issue 14, defects 4 and 6).

- `TimedH11Protocol`: uvicorn's h11 protocol, plus a deadline for a request's head. uvicorn
  closes a connection that idles after a response (timeout_keep_alive) but not one that never
  sends a request, nor one that sends its headers a byte at a time (slowloris).
- `BodyGuard`: ASGI middleware that reads the request body itself, refusing (413) more than
  `max_body_bytes` and closing (408) a body that stalls past `body_timeout_s`, before the
  application parses any of it.
- `GuardedHTTPServer` (from `largemodel.guardedhttp`, shared with the operator): the stdlib
  ThreadingHTTPServer the pod's metrics port runs on, with a socket timeout per read, a deadline
  per connection and a cap on concurrent connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from largemodel.guardedhttp import GuardedHTTPServer

__all__ = ["BodyGuard", "GuardedHTTPServer", "TimedH11Protocol"]

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # from connect (or the end of the last response) to the end of the next request head
KEEP_ALIVE_S = 5  # idle time after a response before the connection is closed
BODY_TIMEOUT_S = 30.0  # from the end of the head to the end of the body
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # equal to gRPC's default maximum message size

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[None]]


class TimedH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose next request head is not complete in time."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's head."""
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: object = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle is self._seen_cycle and self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            log.info("http.head_timeout client=%s action=close", self.client)
            if self.conn.our_state != h11.ERROR:
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def handle_events(self) -> None:
        """h11's events; a new request cycle means its head arrived: stop the head clock."""
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    def on_response_complete(self) -> None:
        """Keep-alive: the next request's head gets the same deadline."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock with the connection."""
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None
        super().connection_lost(exc)


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class BodyGuard:
    """Reads (and bounds) the whole request body before the application sees the request.

    `on_refused(status)` is called for every refusal so it is counted like any other error.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float = BODY_TIMEOUT_S, on_refused: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.on_refused = on_refused

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Refuse oversized or stalled bodies; replay a good body to the application."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._refuse(send, 413, f"the request body is larger than {self.max_body_bytes} bytes",
                               "body_too_large")
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await self._refuse(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                   "request_timeout")
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await self._refuse(send, 413, f"the request body is larger than {self.max_body_bytes} bytes",
                                   "body_too_large")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Callable[[dict[str, Any]], Awaitable[None]], status: int, message: str,
                      code: str) -> None:
        if self.on_refused is not None:
            self.on_refused(status)
        body = _error_body(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
