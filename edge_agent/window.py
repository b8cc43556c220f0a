"""One uplink connection's publishing window: the messages queued and in flight, handed to the
connection's paho client and settled by its acknowledgements (the drain's hot path, SPEC §5).

A message goes to paho when the window has room, in queue order (the drain order), so that the
slots freed by one read's acknowledgements go out in one write. Its rows are deleted (by the
uplink, from `Session.done`) only after paho reported its PUBACK / PUBCOMP, or for QoS 0 its
write; anything else is outcome unknown and the rows stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from edge_agent.buffer import StoredEvent
from edge_agent.link import PROGRESS_SLACK, LinkDead, LinkFailure, LocalFailure, PublishTimeout
from edge_agent.messages import Message
from mqtt_ingest import failpoints

__all__ = ["MID_SPAN", "Session"]

# paho numbers packets 1..65535 and wraps: a message is not sent while the oldest in flight was
# sent this many publishes ago (with a margin), so a packet id is never reused while in flight.
MID_SPAN = 65_000


@dataclass
class Session:
    """What one connection has queued and in flight, and the paho side of publishing it:
    messages go straight to paho (`pump`), acknowledgements come back through its
    ``on_publish`` (`acknowledged`), a watchdog fails the session on a late one (`expire`)."""

    window: int
    window_bytes: int
    publish_timeout: float
    mqtt: paho.Client  # the connection's paho client (under aiomqtt), which publishes
    on_delivered: Callable[[list[int], int], None]  # seqs acknowledged, at this QoS
    inflight: dict[int, Message] = field(default_factory=dict)  # by packet id, oldest first
    taken: dict[int, int] = field(default_factory=dict)  # seq -> priority: sent, not yet deleted
    # Acknowledged, rows not deleted, where a read may come to them again: set-aside events,
    # and those of an earlier connection (`Uplink.undeleted`).
    settling: set[int] = field(default_factory=set)
    done: list[int] = field(default_factory=list)  # acknowledged, to delete
    # Fed in drain order, up to a window: when one read brings many acknowledgements, the
    # freed slots are refilled in the same turn of the loop and go out in one write.
    outbox: deque[Message] = field(default_factory=deque)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    failure: LinkFailure | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    published: int = 0  # messages handed to paho on this connection
    ramp_round: int = 0  # size of the last round of messages resent after one loss (0: none)
    ramp_left: int = 0  # messages that round may still take
    bytes_out: int = 0  # payload bytes queued or in flight (``window_bytes``)
    pumping: bool = False  # a `pump` is scheduled
    last_ack_at: float = 0.0  # loop time of the last acknowledgement on this connection
    silence_limit: float = math.inf  # seconds without inbound bytes after which the link is dead
    renew_at: float | None = None  # loop time to reconnect with a fresh token
    renewing: bool = False  # decided: the feeder returns and the connection is renewed
    _renewal_timer: asyncio.TimerHandle | None = None
    received_at: list[float] = field(default_factory=lambda: [time.monotonic()])  # last bytes in
    progress: Callable[[int], bool] = lambda budget: False  # `SendProgress.moved`
    moved_at: float = 0.0  # loop time our backlog of bytes last moved (`progress`)
    _moved_mono: float = 0.0  # the same, time.monotonic() (the clock of ``received_at``)
    ahead: tuple[tuple[int, int], asyncio.Task[list[StoredEvent]]] | None = None  # (cursor, fetch)

    def fail(self, failure: LinkFailure) -> None:
        if self.failure is None:
            self.failure = failure
        self.changed.set()

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def renewal_due(self) -> bool:
        return self.renew_at is not None and self.loop.time() >= self.renew_at

    def schedule_renewal(self, delay: float | None = None) -> None:
        """Wake waiters at ``renew_at`` (moved ``delay`` seconds from now if given)."""
        if self._renewal_timer is not None:
            self._renewal_timer.cancel()
        if delay is not None:
            self.renew_at = self.loop.time() + delay
        if self.renew_at is not None:
            self._renewal_timer = self.loop.call_at(self.renew_at, self.changed.set)

    def close(self) -> None:
        """The connection is over: no more timers."""
        if self._renewal_timer is not None:
            self._renewal_timer.cancel()

    async def wait(self, limit: float | None = None) -> None:
        """Until something changes (an ack, a failure, new events), or ``limit`` seconds."""
        self.check()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self.changed.wait()
        self.changed.clear()
        self.check()

    def full(self) -> bool:
        """No room for another message: a window queued, or ``window_bytes`` queued and in
        flight (0 bytes is below any limit: one message always goes, however large)."""
        return len(self.outbox) >= self.window or self.bytes_out >= self.window_bytes

    def queue(self, message: Message) -> None:
        """Queue ``message`` behind the others; `pump` hands it to paho when the window has room."""
        for seq in message.seqs:
            self.taken[seq] = message.priority
        self.bytes_out += len(message.payload)
        self.outbox.append(message)
        if not self.pumping:
            self.pumping = True
            self.loop.call_soon(self.pump)

    def pump(self) -> None:
        """Hand queued messages to paho while the window has room, in queue order (so the order
        on the wire is the drain order); paho writes them when the loop finds the socket
        writable, those of one turn together."""
        self.pumping = False
        outbox, inflight, window = self.outbox, self.inflight, self.window
        now = self.loop.time()
        while outbox and len(inflight) < window and self.failure is None:
            if inflight and self.published - next(iter(inflight.values())).number >= MID_SPAN:
                break  # the next packet id could be the oldest message's: wait for its ack
            message = outbox.popleft()  # if it is not sent: no attempt counted, the row stays
            try:
                failpoints.hit("drain.before_publish")
                info = self.mqtt.publish(message.topic, message.payload, message.qos)
            except Exception as exc:  # a failpoint, or paho refusing the message
                self.fail(LinkFailure(f"publish failed: {exc}"))
                return
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self.fail(LinkFailure(f"publish failed: {paho.error_string(info.rc)}"))
                return
            message.sent_at = now
            message.number = self.published
            self.published += 1
            if inflight.setdefault(info.mid, message) is not message:  # see MID_SPAN: never
                self.fail(LinkFailure(f"packet id {info.mid} reused while in flight"))
                return
        if len(outbox) <= window // 2:
            self.changed.set()  # room: the feeder refills the queue in one go

    def acknowledged(self, mid: int, code: object) -> None:
        """paho's ``on_publish``: PUBACK / PUBCOMP received (QoS 0: the PUBLISH written)."""
        message = self.inflight.get(mid)
        if message is None:
            return
        if getattr(code, "is_failure", False):  # MQTT 5 reason codes; 3.1.1 has none
            self.fail(LinkFailure(f"publish refused: {code}"))
            return
        if failpoints.active() and not self._hit_or_fail("drain.after_publish_before_puback"):
            return  # a crash with the message acknowledged by the server, not yet by us
        del self.inflight[mid]
        self.last_ack_at = self.loop.time()
        seqs = message.seqs
        self.done += seqs
        self.on_delivered(seqs, message.qos)
        self.acked.set()
        if failpoints.active():  # a crash with the acknowledgement noted, the rows not deleted
            self._hit_or_fail("drain.after_puback_before_delete")
        size = len(message.payload)
        self.bytes_out -= size
        limit = self.window_bytes
        if not self.inflight or self.bytes_out < limit <= self.bytes_out + size:
            self.changed.set()  # the feeder waits for an empty window or for bytes
        if self.outbox and not self.pumping:
            self.pumping = True  # once for all the acknowledgements of this read
            self.loop.call_soon(self.pump)

    async def expire(self) -> None:
        """Fail the session when messages are in flight and none was acknowledged for
        ``publish_timeout`` (outcome unknown: the rows stay and are sent again), or when nothing at
        all was received for ``silence_limit`` (a blackholed link: keep-alive pings unanswered).

        Measured from the later of the oldest message's hand-off, the last acknowledgement and
        the last progress of our bytes (`progress`): on a slow link a full window, or one large
        message, takes longer than the timeout to cross, and while it moves the link is working,
        not late (RELIABILITY F6). Progress also counts as something received, but only until
        the sink has a PINGREQ sent since the last byte back, or two of the largest messages in
        flight (`PROGRESS_SLACK` more each time): a peer that acknowledges at the TCP level but
        never answers (a middlebox in front of a hung server) is dead all the same.
        """
        timeout = self.publish_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4, self.silence_limit / 8))
            try:
                failure = self._expired(timeout)
            except Exception as exc:  # never leave the link unwatched
                failure = LocalFailure(f"the link's watchdog failed: {exc!r}")
            if failure is not None:
                self.fail(failure)
                return

    def _expired(self, timeout: float) -> LinkFailure | None:
        now = time.monotonic()
        # The answers the sink owes (PUBACK/PUBREC of QoS 1/2 in flight, the PINGRESP that
        # `progress` asks for) bound progress (docs/uplink.md).
        answered = [len(m.payload) for m in self.inflight.values() if m.qos > 0]
        if self.progress(2 * max(answered) + PROGRESS_SLACK if answered else 0):
            self._moved_mono = now
            self.moved_at = self.loop.time()
        silent = now - max(self.received_at[0], self._moved_mono)
        if silent >= self.silence_limit:
            return LinkDead(f"nothing received for {silent:.1f}s: the link is dead")
        if self.inflight:
            oldest = next(iter(self.inflight.values()))
            started = max(oldest.sent_at, self.last_ack_at, self.moved_at)
            if self.loop.time() - started >= timeout:
                return PublishTimeout(f"publish not confirmed within {timeout:g}s")
        return None

    def _hit_or_fail(self, name: str) -> bool:
        """Fire failpoint ``name`` (kill9 ends the process here); one that raises fails the session.
        Returns whether the session may go on."""
        try:
            failpoints.hit(name)
        except Exception as exc:
            self.fail(LinkFailure(f"{name}: {exc}"))
            return False
        return True
