"""A tiny HTTP server for the services' side endpoints (readiness, metrics), on the event loop.

HTTP/1.0-style: one request per connection, answered and closed. Requests are bounded: 8 KiB of
request line and headers, 2 s to send them, at most ``MAX_CLIENTS`` at a time. When all are
taken, a new connection closes the oldest one still sending its request (a probe sends its
request at once: sockets that send nothing cannot keep readiness probes out), or is closed at
once if every one is being answered. ``GET`` and ``HEAD`` only (405 otherwise), known paths only
(404), anything malformed gets 400, a handler that fails 500. Leaving the ``async with`` block
ends the requests being answered: none outlives the service.
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
_HEAD_TIMEOUT = 2.0
_WRITE_TIMEOUT = 5.0
_MAX_HEAD = 8 * 1024
_FAILURE_LOG_EVERY = 60.0  # seconds between logged handler failures
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
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
        self._handlers: dict[asyncio.Task[object], asyncio.StreamWriter] = {}
        self._heads: dict[asyncio.Task[object], asyncio.StreamWriter] = {}
        """Those still reading their request, oldest first."""
        self._evicted: set[asyncio.Task[object]] = set()
        """Closed by `_room` for a newer connection, not ended yet."""
        self._closing = False
        self._failure_logged = -_FAILURE_LOG_EVERY

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
        host = f"[{self._host}]" if ":" in self._host else self._host  # an IPv6 address
        log.info(self._announce.format(url=f"http://{host}:{self._bound}"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        handlers = [*self._handlers, *self._evicted]
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._closing or not self._room():
            writer.transport.abort()
            return
        self._handlers[task] = writer
        self._heads[task] = writer
        try:
            await self._answer(reader, writer, task)
        except asyncio.CancelledError:
            if not self._closing and task not in self._evicted:
                raise
            # Ended by our own stop or `_room`: returning is how this task ends cleanly. On
            # Python 3.11 a cancelled connection task logs "Exception in callback" with a
            # traceback (asyncio's StreamReaderProtocol asks a cancelled task for its exception).
        finally:
            self._handlers.pop(task, None)
            self._heads.pop(task, None)
            writer.transport.abort()

    def _room(self) -> bool:
        """Whether a new connection may be served: there is a free slot, or one is made by
        closing the oldest connection still sending its request (its task then ends)."""
        if len(self._handlers) < MAX_CLIENTS:
            return True
        if not self._heads:
            return False
        oldest = next(iter(self._heads))
        self._heads.pop(oldest).transport.abort()
        self._handlers.pop(oldest, None)
        oldest.cancel()  # its request may have come in this very turn: not answered either
        self._evicted.add(oldest)
        oldest.add_done_callback(self._evicted.discard)
        return True

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[object]
    ) -> None:
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                lines = await _read_head(reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            if task in self._heads:  # not closed by `_room` for a newer connection
                await _respond(writer, Response(400, b"bad request\n"))
            return
        except ConnectionError:
            return
        finally:
            self._heads.pop(task, None)
        parts = lines[0].split(b" ") if lines else []
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            await _respond(writer, Response(400, b"bad request\n"))
            return
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        head_only = method == b"HEAD"  # the answer to a HEAD has no body, whatever it is
        handler = self._routes.get(path)
        if handler is None:
            await _respond(writer, Response(404, b"not found\n"), head_only=head_only)
            return
        if method not in (b"GET", b"HEAD"):
            await _respond(writer, Response(405, b"method not allowed\n"))
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        try:
            response = await handler(Request(method, path, headers))
        except Exception:
            now = asyncio.get_running_loop().time()
            if now - self._failure_logged >= _FAILURE_LOG_EVERY:  # a client may repeat it
                self._failure_logged = now
                log.exception(
                    "HTTP %s %s failed", method.decode("latin-1"), path[:100].decode("latin-1")
                )
            response = Response(500, b"internal error\n")
        await _respond(writer, response, head_only=head_only)


async def _read_head(reader: asyncio.StreamReader) -> list[bytes]:
    """The request line and header lines, up to the empty line. A bare LF ends a line too (RFC
    9112 §2.2: `printf 'GET /readyz HTTP/1.0\\n\\n' | nc` waited 2 s for a 400)."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\n")
        size += len(line)
        if size > _MAX_HEAD:
            raise asyncio.LimitOverrunError("request head too long", size)
        line = line[:-1].removesuffix(b"\r")
        if not line:
            return lines
        lines.append(line)


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
        async with asyncio.timeout(_WRITE_TIMEOUT):
            await writer.wait_closed()
