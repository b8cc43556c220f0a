"""The Prometheus endpoint both wings serve: ``GET /metrics`` on a small asyncio HTTP server.

It runs on the service's own event loop (no thread that could outlive the service) and exposes one
`prometheus_client.CollectorRegistry` that its owner built; nothing is registered in
prometheus-client's global default registry, so several agents or sinks can share a process.

Before each scrape the optional ``refresh`` coroutine runs (the agent reads its buffer there,
through the buffer's own thread); concurrent scrapes share one refresh. A refresh that fails or
takes longer than ``REFRESH_TIMEOUT`` does not fail the scrape: the collectors serve what they
have, and the failure is logged once until a refresh succeeds again.

HTTP/1.0-style: one request per connection, answered and closed; 8 KiB of request line and headers
within 5 s; at most ``MAX_CLIENTS`` requests at a time (more are closed at once). The text format
0.0.4 unless the ``Accept`` header asks for OpenMetrics. ``HEAD`` works; other methods get 405,
other paths 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["MAX_CLIENTS", "REFRESH_TIMEOUT", "MetricsServer"]

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
REFRESH_TIMEOUT = 10.0
_REQUEST_TIMEOUT = 5.0
_MAX_HEAD = 8 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsServer:
    """``async with MetricsServer(host, port, registry, refresh=...)``; ``port`` is the bound
    port (0 picks a free one), logged as ``<name>: metrics at http://HOST:PORT/metrics``."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        name: str = "metrics",
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._refresh = refresh
        self._name = name
        self._server: asyncio.Server | None = None
        self._bound: int | None = None
        self._refresh_lock = asyncio.Lock()
        self._refresh_failing = False
        self._handlers: set[asyncio.Task[object]] = set()

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("the metrics server is not started")
        return self._bound

    async def __aenter__(self) -> MetricsServer:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=_MAX_HEAD
        )
        self._bound = self._server.sockets[0].getsockname()[1]
        # Not "listening on": tests and operators grep that for the MQTT port.
        log.info("%s: metrics at http://%s:%d/metrics", self._name, self._host, self._bound)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.close()
        # Requests being answered end with the service: none of them outlives it.
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._handlers) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self._handlers.add(task)
        try:
            await self._answer(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            await _respond(writer, 400, b"bad request\n")
            return
        except ConnectionError:
            return
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            await _respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            await _respond(writer, 404, b"not found\n")
            return
        if method not in (b"GET", b"HEAD"):
            await _respond(writer, 405, b"method not allowed\n")
            return
        accept = ""
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"accept":
                accept = value.strip().decode("latin-1")
        await self._refreshed()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        await _respond(writer, 200, body, content_type, head_only=method == b"HEAD")

    async def _refreshed(self) -> None:
        """Run ``refresh`` (one at a time); never raises but cancellation."""
        if self._refresh is None:
            return
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT), self._refresh_lock:
                await self._refresh()
        except Exception as exc:
            if not self._refresh_failing:
                log.warning(
                    "%s: refreshing metrics failed, serving older figures: %r", self._name, exc
                )
            self._refresh_failing = True
            return
        if self._refresh_failing:
            log.info("%s: refreshing metrics works again", self._name)
            self._refresh_failing = False


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(head if head_only else head + body)
    writer.close()
    # A client that never reads must not hold the task: bounded, then the socket is gone.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            await writer.wait_closed()
