"""A strict, small MQTT 3.1.1 server that acknowledges a PUBLISH only once a durable stage has it.

What it does (SPEC §3, §4, §7):

- CONNECT within ``limits.connect_timeout`` of accept, then authentication through the plugged
  `Authenticator` (with the TLS-verified peer certificate); a refusal gets its CONNACK code.
- PUBLISH at QoS 0/1/2 goes, after the topic-rights check, to a `Batcher` that feeds the
  `DurableStage` in batches gathered across connections. PUBACK (QoS 1) and PUBREC (QoS 2) leave
  only after the stage confirmed the event, in the order the PUBLISH packets arrived (MQTT 3.1.1
  §4.6). A QoS 2 packet id seen again before its PUBREL is answered without forwarding it twice.
- If the stage fails, refuses an event or times out, nothing more is acknowledged on that
  connection and it is closed: the client still holds the event and sends it again.
- At ``limits.max_inflight`` unacknowledged events the connection stops reading its socket, so a
  stalled stage stalls its producers (TCP backpressure) instead of growing memory.
- With an `Availability` gate: while it is closed no connection is read (keep-alive paused, as
  above) and a new CONNECT gets CONNACK 3 "server unavailable", counted but not logged each time.
- Malformed packets, a second CONNECT, reserved or server-to-client packet types, publishes outside
  the identity's rights and a silent keep-alive close the connection. A new connection with the
  client id of a live one takes over (the old one is closed). SUBSCRIBE is answered with a SUBACK
  failure unless the topic rights allow it (nothing is ever delivered: this is not a broker).
- `stop` stops accepting, lets in-flight events finish within ``limits.stop_deadline`` and closes
  every connection (a CONNECT still being authenticated gets CONNACK 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType

from mqtt_ingest.batching import Batcher
from mqtt_ingest.clock import Clock, SystemClock
from mqtt_ingest.connection import Connection, succeeded
from mqtt_ingest.limits import Limits
from mqtt_ingest.metrics import Counters
from mqtt_ingest.ports import (
    AllowAll,
    Authenticator,
    Availability,
    ConnectRequest,
    DurableStage,
    Identity,
    IngestEvent,
    Metrics,
    TopicRights,
)

__all__ = ["ORPHANS_PER_INFLIGHT", "IngestServer"]

log = logging.getLogger(__name__)

ORPHANS_PER_INFLIGHT = 4
"""QoS 0 events closed connections may leave queued for the stage, in ``max_inflight``s."""


class IngestServer:
    """Use as ``async with IngestServer(...) as server:``; ``server.port`` is the bound port."""

    def __init__(
        self,
        *,
        stage: DurableStage,
        authenticator: Authenticator,
        rights: TopicRights | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        availability: Availability | None = None,
        name: str = "ingest",
        weigh: Callable[[IngestEvent], int] | None = None,
        max_weight: int = 0,
        connection_log: int = logging.INFO,
    ) -> None:
        """``weigh`` and ``max_weight`` bound each stage call by weight (see `Batcher`).
        ``connection_log``: the level of each client's "connected" and "disconnected" lines
        (the metrics count them whatever it is)."""
        self.limits = limits or Limits()
        self.metrics: Metrics = metrics if metrics is not None else Counters()
        self.name = name
        self.connection_log = connection_log
        self.authenticator = authenticator
        self.rights: TopicRights = rights or AllowAll()
        self.availability = availability
        self._host = host
        self._port = port
        self.ssl_context = ssl_context
        self.clock: Clock = clock or SystemClock()
        self.batcher = Batcher(
            stage,
            self.metrics,
            max_events=self.limits.batch_max_events,
            linger=self.limits.batch_linger,
            timeout=self.limits.stage_timeout,
            concurrency=self.limits.stage_concurrency,
            weigh=weigh,
            max_weight=max_weight,
        )
        self._connections: set[Connection] = set()
        self._clients: dict[str, Connection] = {}
        self._sessions: OrderedDict[str, tuple[dict[int, asyncio.Future[None]], float]] = (
            OrderedDict()
        )
        """Persistent sessions of closed connections: client id -> (QoS 2 packet ids stored and
        awaiting PUBREL, loop time it expires), oldest first."""
        self._session_ids = 0
        """Packet ids in `_sessions`, all sessions together (`Limits.max_session_ids`)."""
        self._orphans = 0
        """QoS 0 events of closed connections still queued for the stage."""
        self._tasks: asyncio.TaskGroup | None = None
        self._batcher_task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._server: asyncio.Server | None = None
        self._stopped = False
        self._bound_port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("the server is not started")
        return self._bound_port

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def close_where(
        self,
        verdict: Callable[[Identity, ConnectRequest], tuple[str, str] | Identity | None],
    ) -> int:
        """Close every authenticated connection for which ``verdict(identity, the request it
        authenticated with)`` returns ``(reason, label)``: nothing more is read or acknowledged
        on it (what was acknowledged stays stored). For credentials withdrawn while connected
        (a deny list, a CRL, a CA file or the authenticator's settings reloaded). An `Identity`
        returned replaces the connection's (`Connection.renew`: it ends at its ``expires_at``);
        None leaves it as it is. Returns how many were closed."""
        closed = 0
        for connection in list(self._connections):
            if connection.identity is None or connection.request is None:
                continue  # not past CONNECT: authentication will judge it
            found = verdict(connection.identity, connection.request)
            if isinstance(found, Identity):
                if found != connection.identity:
                    connection.renew(found)
                continue
            if found is not None:
                log.warning(
                    "%s: closing %s (%s): %s",
                    self.name, connection.client_id, connection.peer, found[0],
                )  # fmt: skip
                connection.abort(*found)
                closed += 1
        return closed

    def close_unauthenticated(self, reason: str, label: str) -> int:
        """Close every connection not yet past CONNECT (its TLS handshake or authentication in
        progress, or done and its CONNECT not yet judged): for a trust store replaced, which
        the handshakes it verified no longer speak for; the clients come back with a new one.
        One log line for them all (they have no device name yet). Returns how many."""
        closed = sum(
            connection.close_unauthenticated(reason, label)
            for connection in list(self._connections)
        )
        if closed:
            log.warning(
                "%s: closing %d connection(s) not yet past CONNECT: %s", self.name, closed, reason
            )
        return closed

    async def __aenter__(self) -> IngestServer:
        self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._batcher_task = self._tasks.create_task(
            self.batcher.run(), name=f"mqtt_ingest.{self.name}.batcher"
        )
        try:
            # Plain TCP, TLS started per connection (`Connection._start_tls`): a socket counts
            # against max_connections from its accept, and the handshake and the CONNECT share
            # one connect_timeout (with asyncio's own TLS listener neither was the case).
            self._server = await asyncio.start_server(
                self._accept,
                self._host,
                self._port,
                # Room for one packet header and a little more; bodies are read with readexactly.
                limit=64 * 1024,
            )
        except BaseException:
            self.batcher.close()  # or the task group waits for the batcher for ever
            self._batcher_task.cancel()
            await self._stack.aclose()
            raise
        self._bound_port = self._server.sockets[0].getsockname()[1]
        log.info(
            "%s: listening on %s:%d (%s)", self.name, self._host, self.port,
            "TLS" if self.ssl_context else "plain",
        )  # fmt: skip
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let in-flight events be stored and acked (up to ``deadline`` seconds,
        default ``limits.stop_deadline``), then close every connection. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        deadline = self.limits.stop_deadline if deadline is None else deadline
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.finish()
        waits = [c.done for c in connections]
        if waits:
            _, late = await asyncio.wait(waits, timeout=deadline)
            for connection in connections:
                if connection.done in late:
                    connection.abort("server stop deadline passed", "stop_deadline")
        # Cancelling the group's tasks (connections that outlived the deadline, the batcher)
        # fails whatever is still queued; nothing of it was acknowledged.
        for connection in list(self._connections):
            if connection.task is not None:
                connection.task.cancel()
        self.batcher.close()  # ends the batcher even if the stage's call swallows the cancel
        if self._batcher_task is not None:
            self._batcher_task.cancel()
        await self._stack.aclose()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("%s: stopped", self.name)

    # -- connections ----------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopped or self._tasks is None:
            writer.transport.abort()
            return
        if len(self._connections) >= self.limits.max_connections:
            self.metrics.inc("connections_refused", reason="max_connections")
            writer.transport.abort()
            return
        transport = writer.transport
        if self.ssl_context is not None and isinstance(transport, asyncio.ReadTransport):
            # Not one byte of the ClientHello may reach the plain reader before start_tls.
            transport.pause_reading()
        connection = Connection(self, reader, writer)
        self._connections.add(connection)
        self.metrics.inc("connections_opened")
        connection.task = self._tasks.create_task(
            connection.run(), name=f"mqtt_ingest.{self.name}.connection"
        )
        connection.task.add_done_callback(connection.ended)

    def register(self, connection: Connection, clean_session: bool) -> bool:
        """Make ``connection`` its client id's; return whether a session was present (MQTT
        3.1.1 §3.2.2.2): with CleanSession 0, the QoS 2 packet ids an earlier connection got
        PUBREC for and no PUBREL, so that their resends are answered, not stored again."""
        client_id = connection.client_id
        old = self._clients.get(client_id)
        kept: dict[int, asyncio.Future[None]] | None = None
        if old is not None and old is not connection:
            log.info(
                "%s: client %r connected again from %s: closing the older connection",
                self.name, client_id, connection.peer,
            )  # fmt: skip
            persistent = not clean_session and not old.clean_session
            if persistent:
                # Before the abort: the old connection's teardown withdraws what it still
                # holds, and this one answers the resends of these (not stored twice). A clean
                # session's state is never resumed (MQTT-3.1.2-6): its packet ids are not ours.
                kept, old.qos2 = old.qos2, {}
                old.handed_over = set(kept.values())
            old.abort("taken over by a new connection", "takeover")
            self.metrics.inc("takeovers")
        stored = self._sessions.pop(client_id, None)
        if stored is not None:
            self._session_ids -= len(stored[0])
        if kept is None and stored is not None and stored[1] > self._loop_time():
            kept = stored[0]
        self._clients[client_id] = connection
        if clean_session or not kept:
            return False
        connection.qos2 = kept
        connection.resumed = set(kept)
        return True

    def leave_qos0(self, futures: list[asyncio.Future[None]], client_id: str) -> None:
        """QoS 0 events of a closed connection still queued for the stage: stored (their client
        never sends them again), unless closed connections left `ORPHANS_PER_INFLIGHT` x
        ``max_inflight`` of them queued already: then withdrawn and counted. A client that
        reconnects again and again behind a slow stage grew the queue without bound."""
        if self._orphans + len(futures) <= ORPHANS_PER_INFLIGHT * self.limits.max_inflight:
            self._orphans += len(futures)
            for future in futures:
                future.add_done_callback(self._orphan_done)
            return
        dropped = self.batcher.withdraw(futures)
        if dropped:
            self.metrics.inc("qos0_dropped", dropped)
            log.warning(
                "%s: %d QoS 0 events of %s not stored: its connection closed, and closed"
                " connections left %d queued for the stage already",
                self.name, dropped, client_id, self._orphans,
            )  # fmt: skip

    def _orphan_done(self, _: asyncio.Future[None]) -> None:
        self._orphans -= 1

    def keep_session(self, client_id: str, qos2: dict[int, asyncio.Future[None]]) -> None:
        """Keep the QoS 2 state of a closed persistent session: what was stored, and what is in
        a stage call now (a resend waits for its outcome instead of being stored again)."""
        stored = {
            packet_id: future
            for packet_id, future in qos2.items()
            if not future.done() or succeeded(future)
        }
        if not stored:
            return
        # Not bounded by max_inflight (events not yet acknowledged): a client may hold up to
        # max_unreleased ids PUBREC'd and not released (MQTT 3.1.1 has no receive maximum), and
        # a session cut at max_inflight + 1 was forgotten whole, its resends stored twice. The
        # memory of all sessions together is bounded by max_session_ids below.
        earlier = self._sessions.pop(client_id, None)
        if earlier is not None:
            self._session_ids -= len(earlier[0])
        self._sessions[client_id] = (stored, self._loop_time() + self.limits.session_expiry)
        self._session_ids += len(stored)
        # The oldest go first beyond either bound: the packet ids of all sessions together are
        # bounded too (10,000 sessions of 256 ids each held half a gigabyte, and any process
        # on the gateway can open sessions on the agent's anonymous loopback listener).
        while (
            len(self._sessions) > self.limits.max_sessions
            or self._session_ids > self.limits.max_session_ids
        ):
            _, (dropped, _) = self._sessions.popitem(last=False)
            self._session_ids -= len(dropped)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    def is_current(self, connection: Connection) -> bool:
        """Whether ``connection`` is the one its client id is registered to now."""
        return bool(connection.client_id) and self._clients.get(connection.client_id) is connection

    def forget(self, connection: Connection) -> None:
        self._connections.discard(connection)
        if connection.client_id and self._clients.get(connection.client_id) is connection:
            del self._clients[connection.client_id]
