"""A tiny HTTP server for the services' side endpoints (readiness, metrics), on the event loop.

HTTP/1.0-style: one request per connection, answered and closed. Requests are bounded: 8 KiB of
request line and headers, 5 s to send them, at most ``MAX_CLIENTS`` at a time (more are closed
at once). ``GET`` and ``HEAD`` only (405 otherwise), known paths only (404), anything malformed
gets 400. Leaving the ``async with`` block cancels the requests being answered: none outlives
the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["MAX_CLIENTS", "HttpEndpoint", "Request", "Response"]

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
_REQUEST_TIMEOUT = 5.0
_MAX_HEAD = 8 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: bytes
    path: bytes  # without the query string
    headers: Mapping[bytes, bytes]  # names in lower case


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[Request], Awaitable[Response]]


class HttpEndpoint:
    """``async with HttpEndpoint(host, port, {b"/path": handler}, announce=...)``; ``port`` is
    the bound port (0 picks a free one). ``announce`` is logged once listening, with ``{url}``
    replaced by ``http://HOST:PORT``."""

    def __init__(
        self, host: str, port: int, routes: Mapping[bytes, Handler], *, announce: str
    ) -> None:
        self._host = host
        self._port = port
        self._routes = routes
        self._announce = announce
        self._server: asyncio.Server | None = None
        self._bound: int | None = None
        self._handlers: set[asyncio.Task[object]] = set()

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("the HTTP endpoint is not started")
        return self._bound

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=_MAX_HEAD
        )
        self._bound = self._server.sockets[0].getsockname()[1]
        # Never "listening on": tests and operators grep that for the MQTT port.
        log.info(self._announce.format(url=f"http://{self._host}:{self._bound}"))
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
            await _respond(writer, Response(400, b"bad request\n"))
            return
        except ConnectionError:
            return
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            await _respond(writer, Response(400, b"bad request\n"))
            return
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        handler = self._routes.get(path)
        if handler is None:
            await _respond(writer, Response(404, b"not found\n"))
            return
        if method not in (b"GET", b"HEAD"):
            await _respond(writer, Response(405, b"method not allowed\n"))
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        response = await handler(Request(method, path, headers))
        await _respond(writer, response, head_only=method == b"HEAD")


async def _respond(
    writer: asyncio.StreamWriter, response: Response, *, head_only: bool = False
) -> None:
    head = (
        f"HTTP/1.1 {response.status} {_REASONS[response.status]}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(head if head_only else head + response.body)
    writer.close()
    # A client that never reads must not hold the task: bounded, then the socket is gone.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            await writer.wait_closed()
