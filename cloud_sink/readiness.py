"""A tiny HTTP endpoint for load balancers and systemd-style probes (SPEC §7).

- ``GET /healthz``: 200 ``ok`` while the process serves HTTP at all (liveness).
- ``GET /readyz``: 200 ``ready`` only while the MQTT listener is up and the core queue is up;
  otherwise 503 with a one-line reason (``starting``, ``core queue down: ...``, ``draining``).
  A load balancer takes an instance out of rotation on 503, e.g. during an outage of its core
  queue or while SIGTERM drains it.

HTTP/1.0-style: one request per connection, answered and closed. Requests are bounded (8 KiB of
request line and headers, 5 s to send them); anything else gets 404 / 405 / 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

__all__ = ["ReadinessServer"]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 5.0
_MAX_HEAD = 8 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class ReadinessServer:
    """``async with ReadinessServer(host, port, not_ready)``; ``not_ready()`` returns None when
    ready, else the reason. ``port`` is the bound port (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, not_ready: Callable[[], str | None]) -> None:
        self._host = host
        self._port = port
        self._not_ready = not_ready
        self._server: asyncio.Server | None = None
        self._bound: int | None = None

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("the readiness server is not started")
        return self._bound

    async def __aenter__(self) -> ReadinessServer:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=_MAX_HEAD
        )
        self._bound = self._server.sockets[0].getsockname()[1]
        # Not "listening on": tests and operators grep that for the MQTT port.
        log.info("readiness endpoint at http://%s:%d/readyz", self._host, self._bound)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body = self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, body = 400, "bad request\n"
        except ConnectionError:
            writer.transport.abort()
            return
        method = head.split(b" ", 1)[0] if status != 400 else b""
        payload = body.encode()
        out = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(out if method == b"HEAD" else out + payload)
        writer.close()
        # A client that never reads must not hold the task: bounded, then the socket is gone.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                await writer.wait_closed()
        writer.transport.abort()

    def _answer(self, head: bytes) -> tuple[int, str]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/healthz", b"/readyz"):
            return 404, "not found\n"
        if method not in (b"GET", b"HEAD"):
            return 405, "method not allowed\n"
        if target == b"/healthz":
            return 200, "ok\n"
        reason = self._not_ready()
        if reason is None:
            return 200, "ready\n"
        return 503, f"not ready: {reason}\n"
