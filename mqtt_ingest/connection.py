"""One client connection of the `IngestServer` (mqtt_ingest/server.py): its life from the accept
to the teardown, its read loop, and its ordered acknowledgements. The TLS handshake, CONNECT and
authentication are `mqtt_ingest.handshake`.

Events go to the server's `Batcher`; an acknowledgement (PUBACK, PUBREC, PUBCOMP) is written
only once the stage confirmed the event, in the order the packets arrived. The session state
(QoS 2 packet ids awaiting PUBREL) is handed over to the server when the connection ends
(`IngestServer.keep_session`) or to a connection taking it over (`IngestServer.register`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mqtt_ingest import failpoints
from mqtt_ingest.batching import StageFailed
from mqtt_ingest.codec import (
    SUBACK_FAILURE,
    ConnackCode,
    Disconnect,
    MalformedPacket,
    PacketTooLarge,
    PingReq,
    Publish,
    PubRel,
    Subscribe,
    Unsubscribe,
    encode_connack,
    encode_pingresp,
    encode_puback,
    encode_pubcomp,
    encode_pubrec,
    encode_suback,
    encode_unsuback,
    read_packet,
)
from mqtt_ingest.handshake import Close, Handshake
from mqtt_ingest.lifecycle import drop_outcome
from mqtt_ingest.ports import Action, ConnectRequest, Identity, IngestEvent

if TYPE_CHECKING:
    from mqtt_ingest.server import IngestServer

__all__ = ["Connection", "succeeded"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    """One entry of a connection's ordered ack queue."""

    future: asyncio.Future[None]
    ack: bytes | None  # None for QoS 0: stored, but nothing to send
    counts_as_event: bool


def succeeded(future: asyncio.Future[None]) -> bool:
    """A done stage future that succeeded."""
    return not future.cancelled() and future.exception() is None


class Connection:
    def __init__(
        self, server: IngestServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.metrics = server.metrics
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_id = ""
        self.identity: Identity | None = None
        self.request: ConnectRequest | None = None
        """What the connection authenticated with (kept to judge it again at a reload)."""
        self.task: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks: deque[_Pending] = deque()
        self.qos2: dict[int, asyncio.Future[None]] = {}
        self.clean_session = True
        self.handed_over: set[asyncio.Future[None]] = set()
        """QoS 2 events a connection that took over this one answers for."""
        self.resumed: set[int] = set()
        """QoS 2 packet ids kept from an earlier connection, not yet seen on this one."""
        self._ack_wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._draining = False
        self._stopping = False
        self._close_reason: Close | None = None
        self._aborted = False
        self._torn_down = False
        self._read_task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._connect_by = asyncio.get_running_loop().time() + self.limits.connect_timeout
        """The TLS handshake (if any) and the CONNECT must be done by then."""

    # -- control from outside -------------------------------------------------------------------

    def finish(self) -> None:
        """Stop reading; acknowledge what is in flight, then close."""
        self._stopping = True
        self._draining = True
        if self._read_task is not None:
            self._read_task.cancel()
        elif self.task is not None and self.identity is None:
            # Cancelled, not aborted: a transport aborted under a TLS handshake in progress makes
            # Python 3.11's start_tls return no transport, and the stream fails on it.
            if self._close_reason is None:
                self._close_reason = Close("server stopping", label="server_stop")
            self.task.cancel()
        self._ack_wakeup.set()

    def abort(self, reason: str, label: str) -> None:
        """Close now: nothing more is read, handed to the stage or acknowledged (events already
        in a stage call may still be stored), and the connection's slot is free at once."""
        if self._close_reason is None:
            self._close_reason = Close(reason, label=label)
        self._aborted = True
        self.writer.transport.abort()
        self._ack_wakeup.set()
        if self.task is not None and self.task is not asyncio.current_task():
            # Its read loop may wait for room (max_inflight) and its ack writer for the stage:
            # the connection used to live on until the stage answered (up to its timeout),
            # holding its slot, and then read on from what it had buffered, handing a revoked
            # device's events to the stage. Cancelled, it withdraws them (`_teardown`).
            self.task.cancel()

    def close_unauthenticated(self, reason: str, label: str) -> bool:
        """Close the connection if it is not yet past CONNECT (identity None); whether it was.
        As `finish` does it: its task cancelled, the transport left to its teardown (aborted
        under a TLS handshake in progress, Python 3.11's start_tls returns no transport)."""
        task = self.task
        if self.identity is not None or self._aborted or task is None or task.done():
            return False
        if self._close_reason is None:
            self._close_reason = Close(reason, label=label)
        task.cancel()
        return True

    def ended(self, _task: asyncio.Task[None]) -> None:
        """The connection's task is done. Its teardown has run, unless it was cancelled before
        its first step (a stop in the same turn of the loop as the accept): then nothing else
        closes the socket or frees the slot, and `stop` waited its whole deadline for it."""
        if self.done.done():
            return
        self.writer.transport.abort()
        if not self._torn_down:
            self.server.forget(self)
            label = self._close_reason.label if self._close_reason is not None else "server_stop"
            self.metrics.inc("connections_closed", reason=label)
        self.done.set_result(None)

    # -- the connection's life ------------------------------------------------------------------

    async def run(self) -> None:
        reason, label = "closed", "closed"
        try:
            await self._session()
            if self._stopping:
                reason, label = "server stopping", "server_stop"
            else:
                reason, label = "client disconnected", "disconnect"
        except* Close as group:
            first = self._close_reason or group.exceptions[0]
            assert isinstance(first, Close)
            reason, label = first.reason, first.label
        except* (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError) as group:
            # Usually the writer side of a connection that abort() already closed.
            lost = self._close_reason or Close(repr(group.exceptions[0]), label="connection_lost")
            reason, label = lost.reason, lost.label
        except* Exception:
            log.exception("%s: connection %s failed", self.server.name, self.peer)
            reason, label = "internal error", "internal_error"
        finally:
            if label == "closed" and self._close_reason is not None:  # cancelled by finish()
                reason, label = self._close_reason.reason, self._close_reason.label
            await self._teardown(reason, label)

    async def _teardown(self, reason: str, label: str) -> None:
        self._torn_down = True
        if self._expiry is not None:
            self._expiry.cancel()
        for pending in self._acks:
            pending.future.add_done_callback(drop_outcome)
        # QoS 1/2 events not yet in a stage call are withdrawn (the client, unacknowledged,
        # keeps them): queued behind a slow stage they outlived their connection, and a client
        # reconnecting and sending again grew the batcher's queue without bound. Not QoS 0 (no
        # resend comes), nor QoS 2 events a taking-over connection now answers for.
        handed_over = self.handed_over
        self.server.batcher.withdraw(
            pending.future
            for pending in self._acks
            if pending.ack is not None and pending.future not in handed_over
        )
        qos0 = [p.future for p in self._acks if p.ack is None and not p.future.done()]
        if qos0:
            self.server.leave_qos0(qos0, self.client_id)
        for future in self.qos2.values():
            future.add_done_callback(drop_outcome)
        self._acks.clear()
        if not self.clean_session and self.identity is not None and self.server.is_current(self):
            self.server.keep_session(self.client_id, self.qos2)
        self.server.forget(self)
        self.metrics.inc("connections_closed", reason=label)
        if self.identity is not None:
            log.log(
                self.server.connection_log,
                "%s: %s (%s) disconnected: %s",
                self.server.name, self.client_id, self.peer, reason,
            )  # fmt: skip
        else:
            log.debug(
                "%s: %s closed before CONNECT completed: %s", self.server.name, self.peer, reason
            )
        transport = self.writer.transport
        if self._close_reason is not None or label not in (
            "disconnect",
            "server_stop",
        ):
            transport.abort()
        else:
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await asyncio.shield(self.writer.wait_closed())
            transport.abort()
        if not self.done.done():
            self.done.set_result(None)

    async def _session(self) -> None:
        await self._handshake()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._write_acks(), name="mqtt_ingest.connection.acks")
            self._read_task = tasks.create_task(
                self._read_loop(), name="mqtt_ingest.connection.read"
            )
            if self._draining:  # stop() came while we were authenticating
                self._read_task.cancel()

    async def _handshake(self) -> None:
        """TLS, CONNECT and authentication (`Handshake`), then the session registered and
        CONNACK 0 sent."""
        handshake = Handshake(
            self.server, self.reader, self.writer, self.peer, self._connect_by,
            stopping=lambda: self._stopping,
        )  # fmt: skip
        admission = await handshake.run()
        request = admission.request
        client_id = request.client_id
        self.client_id = client_id
        self.identity = admission.identity
        self.request = request
        self._expire_at(admission.identity.expires_at)
        keep_alive = request.keep_alive
        if keep_alive == 0 or keep_alive > self.limits.max_keep_alive:
            keep_alive = self.limits.max_keep_alive
        self._keep_alive_timeout = keep_alive * self.limits.keep_alive_factor
        self.clean_session = request.clean_session
        present = self.server.register(self, self.clean_session)
        self.writer.write(encode_connack(ConnackCode.ACCEPTED, session_present=present))
        self.metrics.inc("connects_accepted")
        log.log(
            self.server.connection_log,
            "%s: %s connected from %s as %s (keep-alive %ds)",
            self.server.name, client_id, self.peer, admission.identity.name, request.keep_alive,
        )  # fmt: skip

    def _expire_at(self, expires_at: float | None) -> None:
        """Close the connection at ``expires_at`` (wall-clock seconds), and not at another
        time set before; None: at no time."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires_at is None:
            return
        self._expiry = asyncio.get_running_loop().call_later(
            expires_at - self.server.clock.time(), self.abort, "credentials expired", "expired"
        )

    def renew(self, identity: Identity) -> None:
        """The connection's credentials judged again (a reload of the authenticator's
        settings): ``identity`` replaces the one of its CONNECT, and its ``expires_at`` the
        time the connection ends (closed now if that is past)."""
        if self.identity is None or self._aborted:
            return
        self.identity = identity
        if identity.expires_at is not None and identity.expires_at <= self.server.clock.time():
            self.abort("credentials expired", "expired")
            return
        self._expire_at(identity.expires_at)

    # -- after CONNACK --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        max_size = self.limits.max_packet_size
        max_inflight = self.limits.max_inflight
        gate = self.server.availability
        timeout = self._keep_alive_timeout
        # Moving the deadline costs a new timer; under a stream of packets, move it at most every
        # `refresh` seconds. It can then fire up to `refresh` early: still >= 1.125 x keep-alive.
        refresh = min(1.0, timeout / 4)
        moved_at = -refresh
        try:
            async with asyncio.timeout(None) as keep_alive:

                def progress() -> None:
                    # A large packet still arriving over a slow link: bytes flow, the client is
                    # alive (RELIABILITY F6), though no whole packet came within the deadline.
                    nonlocal moved_at
                    now = loop.time()
                    if now - moved_at >= refresh:
                        keep_alive.reschedule(now + timeout)
                        moved_at = now

                while True:
                    if len(self._acks) >= max_inflight:
                        # Our stage is slow, not the client: the keep-alive does not run meanwhile.
                        keep_alive.reschedule(None)
                        moved_at = -refresh
                        self._space.clear()
                        await self._space.wait()
                        continue
                    if gate is not None and not gate.available:
                        # The stage cannot take events: stop reading, so producers hold them.
                        keep_alive.reschedule(None)
                        moved_at = -refresh
                        await gate.wait_available()
                        continue
                    now = loop.time()
                    if now - moved_at >= refresh:
                        keep_alive.reschedule(now + timeout)
                        moved_at = now
                    packet = await read_packet(self.reader, max_size, progress)
                    if isinstance(packet, Publish):
                        if gate is not None and not gate.available:
                            # Read just before the gate closed: hold this one packet, don't
                            # hand the stage an event it cannot take.
                            keep_alive.reschedule(None)
                            moved_at = -refresh
                            await gate.wait_available()
                        self._on_publish(packet)
                    elif isinstance(packet, PubRel):
                        self._on_pubrel(packet)
                    elif isinstance(packet, PingReq | Subscribe | Unsubscribe):
                        if isinstance(packet, PingReq):
                            self.writer.write(encode_pingresp())
                        elif isinstance(packet, Subscribe):
                            self._on_subscribe(packet)
                        else:
                            self.writer.write(encode_unsuback(packet.packet_id))
                        # Answered at once (not behind the acks), but not faster than the client
                        # reads: one that sends PINGREQs and reads nothing grew our write buffer
                        # without bound. Its keep-alive runs while we wait here.
                        await self.writer.drain()
                    elif isinstance(packet, Disconnect):
                        return
                    else:
                        raise Close("second CONNECT", label="malformed")
        except TimeoutError:
            raise Close("keep-alive expired", label="keep_alive") from None
        except PacketTooLarge as exc:
            self.metrics.inc("malformed", reason="too_large")
            raise Close(exc.reason, label="too_large") from None
        except MalformedPacket as exc:
            self.metrics.inc("malformed")
            raise Close(f"malformed packet: {exc.reason}", label="malformed") from None
        except asyncio.IncompleteReadError as exc:
            if self._close_reason is not None:
                raise self._close_reason from None
            what = "peer closed" if not exc.partial else "peer closed in the middle of a packet"
            raise Close(what, label="peer_closed") from None
        except (ConnectionError, ssl.SSLError) as exc:
            if self._close_reason is not None:
                raise self._close_reason from None
            raise Close(f"connection lost: {exc!r}", label="connection_lost") from None
        finally:
            self._draining = True
            self._ack_wakeup.set()

    def _ended_aborted(self) -> None:
        """Raise the close reason if `abort` came. The read loop may already be woken when the
        connection is aborted (its data came in the same turn of the loop) and run before its
        cancellation: a packet it had buffered must not reach the stage then. After a takeover
        a QoS 2 publish stored that way was stored again when resent on the new connection
        (whose session had no trace of it); after a revocation, a revoked device's event."""
        if self._aborted:
            assert self._close_reason is not None
            raise self._close_reason

    def _on_publish(self, packet: Publish) -> None:
        self._ended_aborted()
        identity = self.identity
        assert identity is not None
        self.metrics.inc("publish_bytes_received", packet.size)
        if not self.server.rights.allowed(identity, packet.topic, Action.PUBLISH):
            self.metrics.inc("security_events", reason="publish_denied")
            log.warning(
                "%s: security: %s (%s) published to %r outside its rights: closing",
                self.server.name, self.client_id, identity.name, packet.topic[:200],
            )  # fmt: skip
            raise Close("publish outside the topic rights", label="publish_denied")
        if packet.qos == 2:
            assert packet.packet_id is not None
            earlier = self.qos2.get(packet.packet_id)
            if self.resumed and packet.packet_id in self.resumed:
                self.resumed.discard(packet.packet_id)
                # From an earlier connection: only a resend (DUP) is that message again. A new
                # one reusing the id (a client that lost its own state) must be stored.
                if not packet.dup:
                    earlier = None
            if earlier is not None and earlier.done() and not succeeded(earlier):
                earlier = None  # (kept from an earlier connection) not stored: store it now
            if earlier is not None:
                # Resent before PUBREL: the first copy is (being) stored; answer, don't forward.
                self.metrics.inc("qos2_duplicates")
                self._queue(_Pending(earlier, encode_pubrec(packet.packet_id), False))
                return
            if packet.packet_id not in self.qos2 and len(self.qos2) >= self.limits.max_unreleased:
                # A client that never sends PUBREL held a future per packet id: up to 65,535
                # of them (14 MB) per connection. An honest one has at most its window. Closed
                # before the event goes to the stage: nothing unacknowledged is stored.
                raise Close(
                    f"over {self.limits.max_unreleased} QoS 2 messages awaiting PUBREL",
                    label="too_many_unreleased",
                )
        event = IngestEvent(
            identity=identity,
            client_id=self.client_id,
            topic=packet.topic,
            payload=packet.payload,
            qos=packet.qos,
            retain=packet.retain,
            received_at=self.server.clock.time(),
        )
        future = self.server.batcher.submit(event)
        self.metrics.inc("events_received")
        if packet.qos == 0:
            self._queue(_Pending(future, None, True))
        elif packet.qos == 1:
            assert packet.packet_id is not None
            self._queue(_Pending(future, encode_puback(packet.packet_id), True))
        else:
            assert packet.packet_id is not None
            self.qos2[packet.packet_id] = future
            self._queue(_Pending(future, encode_pubrec(packet.packet_id), True))

    def _on_pubrel(self, packet: PubRel) -> None:
        self._ended_aborted()
        future = self.qos2.pop(packet.packet_id, None)
        if future is None:
            # Unknown id (answered before, or from an earlier connection): PUBCOMP anyway (§4.3.3).
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
        self._queue(_Pending(future, encode_pubcomp(packet.packet_id), False))

    def _on_subscribe(self, packet: Subscribe) -> None:
        identity = self.identity
        assert identity is not None
        codes = []
        denied: list[str] = []
        for topic_filter, qos in packet.filters:
            if self.server.rights.allowed(identity, topic_filter, Action.SUBSCRIBE):
                codes.append(qos)
            else:
                denied.append(topic_filter)
                codes.append(SUBACK_FAILURE)
        if denied:
            # One line per packet: a 256 KiB SUBSCRIBE holds 60,000 filters, and a line per
            # filter stalled every other connection for most of a second per packet.
            self.metrics.inc("security_events", len(denied), reason="subscribe_denied")
            log.warning(
                "%s: security: %s (%s) may not subscribe to %r%s",
                self.server.name, self.client_id, identity.name, denied[0][:200],
                f" (and {len(denied) - 1} more filters)" if len(denied) > 1 else "",
            )  # fmt: skip
        self.writer.write(encode_suback(packet.packet_id, codes))

    def _queue(self, pending: _Pending) -> None:
        self._acks.append(pending)
        self._ack_wakeup.set()

    async def _write_acks(self) -> None:
        acks = self._acks
        while True:
            if not acks:
                if self._draining:
                    return
                self._ack_wakeup.clear()
                await self._ack_wakeup.wait()
                continue
            head = acks[0].future
            if not head.done():
                # asyncio.wait, unlike await, does not cancel the future if we are cancelled.
                await asyncio.wait((head,))
            out = bytearray()
            acked = 0
            failure: BaseException | None = None
            while acks and acks[0].future.done():
                pending = acks.popleft()
                future = pending.future
                failure = StageFailed("cancelled") if future.cancelled() else future.exception()
                if failure is not None:
                    pending.future.add_done_callback(drop_outcome)
                    break
                if pending.ack is not None:
                    out += pending.ack
                if pending.counts_as_event:
                    acked += 1
            if out:
                failpoints.hit("ingest.before_ack")
                self.writer.write(out)
            if acked:
                self.metrics.inc("events_acked", acked)
            if failure is not None:
                reason = failure.reason if isinstance(failure, StageFailed) else repr(failure)
                raise Close(f"event not stored: {reason}", label="stage_failed")
            if not self._space.is_set() and len(acks) < self.limits.max_inflight:
                self._space.set()
            transport = self.writer.transport
            if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
                await self.writer.drain()  # cannot wait (writing is not paused): no timer
                continue
            try:
                # The read loop stops reading (keep-alive off) while max_inflight acks wait
                # here: a client that stops reading would otherwise hold its slot for ever.
                async with asyncio.timeout(self._keep_alive_timeout):
                    await self.writer.drain()
            except TimeoutError:
                raise Close(
                    f"client read no acks for {self._keep_alive_timeout:g}s", label="write_stalled"
                ) from None
