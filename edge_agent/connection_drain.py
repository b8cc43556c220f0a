"""One connection's drain (`edge_agent.uplink`'s module docstring says what it does).

A `ConnectionDrain` lives as long as one connection: it reads the buffer in drain order, keeps
up to a window of messages in flight (`edge_agent.window.Session`), deletes acknowledged rows in
batches, and when the connection ends counts an attempt for what was lost in flight and judges
an event lost alone in flight (`edge_agent.suspects`). What outlives a connection (the buffer,
the suspects, the link status, the token source) belongs to the `Uplink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING

import aiomqtt
import paho.mqtt.client as paho

from edge_agent.accept import MAX_TOPIC_BYTES
from edge_agent.buffer import StoredEvent
from edge_agent.link import (
    LinkDead,
    LinkFailure,
    LocalFailure,
    PublishTimeout,
    SendProgress,
    limit_unsent,
)
from edge_agent.messages import Message
from edge_agent.token import Token
from edge_agent.window import Session
from mqtt_ingest.envelope import MAX_EVENTS
from mqtt_ingest.lifecycle import drop_outcome
from mqtt_ingest.topics import topic_problem

if TYPE_CHECKING:
    from edge_agent.uplink import Uplink

__all__ = ["ConnectionDrain"]

log = logging.getLogger("edge_agent.uplink")

_MAX_FETCH = MAX_EVENTS  # events per read from the buffer (more only holds more rows in memory)
_DELETE_EVERY = 0.02  # seconds: acknowledged rows are deleted in batches
_STATUS_EVERY = 2.0  # seconds between link.json refreshes while events flow
_KEEPALIVE_TIMEOUT = 141  # the reason code paho gives a link that missed its keep-alive
_TOKEN_FILE_RECHECK = 30.0  # seconds: a token file still unchanged at renewal is looked at again


class ConnectionDrain:
    def __init__(
        self, uplink: Uplink, client: aiomqtt.Client, token: Token, received_at: list[float]
    ) -> None:
        self._uplink = uplink
        self._client = client
        self._token = token  # the token this connection presented
        self._received_at = received_at  # when this connection last received bytes
        self._buffer = uplink.buffer
        self._suspects = uplink.suspects
        self._stopping = uplink.stopping
        self._reconnect = uplink.reconnecting
        self.status = uplink.status
        self._messages = uplink.messages
        # The settings this connection was opened with: a reload replaces the uplink's config
        # for the next connection, while this one finishes with what it announced at CONNECT
        # (the format above all: a raw message on a batch connection would be
        # dead-lettered). Its messages are built with them.
        self.config = uplink.messages.config
        self._preempt = -1  # highest priority committed since the last fetch
        self._up_since = asyncio.get_running_loop().time()  # the connection was just accepted
        # paho pings after `keepalive` s without inbound bytes and gives up `keepalive` s after
        # that (checked once a second): up to 2 x keep-alive + 1 s. A healthy link answers each
        # ping at once, so inbound silence of 1.5 x keep-alive (and at least keep-alive + 2 s,
        # for paho's once-a-second check) means a dead link (RELIABILITY F5).
        keepalive = self.config.keepalive
        self._silence_limit = max(1.5 * keepalive, keepalive + 2.0)
        # A connection up this long since an event's loss: the event set aside is tried again,
        # even with only QoS 0 going through (no evidence of their own; `Suspects.candidate`).
        # At least the silence limit: a link gone silent soon after the CONNACK is found dead
        # before.
        self._patience = max(uplink.config.stable_after, self._silence_limit)
        self.session: Session | None = None

    @property
    def in_flight(self) -> int:
        """MQTT messages sent on this connection and not acknowledged yet."""
        return len(self.session.inflight) if self.session is not None else 0

    def committed(self, priority: int) -> None:
        """New events were committed: events above the cursor are read first."""
        self._preempt = max(self._preempt, priority)
        self.wake()

    def wake(self) -> None:
        """Make the feeder look again (stop, reload, new events)."""
        if self.session is not None:
            self.session.changed.set()

    async def run(self) -> None:
        """Send until the connection is lost or asked to end (stop, reload, token renewal)."""
        client = self._client
        # Messages go straight to paho, acknowledgements come back through its callback: no
        # task, future or timer per message (aiomqtt's `publish` costs about as much again as
        # paho's own work). aiomqtt still owns the connection, its loop and its failures.
        mqtt: paho.Client = client._client  # aiomqtt 2.x: its paho client
        config = self.config
        session = Session(
            config.window, config.window_bytes, config.publish_timeout, mqtt, self._delivered
        )
        session.silence_limit = self._silence_limit
        session.received_at = self._received_at
        session.progress = SendProgress(
            mqtt, self._received_at, grace=session.silence_limit - config.keepalive
        ).moved
        limit_unsent(mqtt.socket())
        if self._uplink.undeleted:
            # Acknowledged on an earlier connection, their rows not deleted (a full disk): the
            # first delete removes them, and no read sends them again meanwhile.
            left, self._uplink.undeleted = self._uplink.undeleted, []
            session.done += left
            session.settling.update(left)
            session.acked.set()
        session.renew_at = self._renew_at(self._token)
        session.schedule_renewal()
        self.session = session

        def acknowledged(_c: object, _u: object, mid: int, code: object, _p: object) -> None:
            session.acknowledged(mid, code)

        mqtt.on_publish = acknowledged
        session.tasks = [
            asyncio.create_task(self._watch(client, session), name="uplink.watch"),
            asyncio.create_task(self._delete_loop(session), name="uplink.delete"),
            asyncio.create_task(session.expire(), name="uplink.expire"),
        ]
        graceful = False
        try:
            await self._feed(client, session)
            await self._settle_inflight(session)
            graceful = True  # a connection lost while settling counts as lost
        finally:
            self.session = None
            session.close()
            mqtt.on_publish = None  # a late acknowledgement is not counted: the row is resent
            session.outbox.clear()
            if session.ahead is not None:
                session.tasks.append(session.ahead[1])
            for task in session.tasks:
                task.cancel()
            await asyncio.gather(*session.tasks, return_exceptions=True)
            try:
                await self._finish(session, graceful)
            finally:
                # What was in flight and not acknowledged is back in the backlog: TTLs and
                # drop-oldest apply to it again (they passed over it while it was held). What
                # was acknowledged and could not be deleted stays held (delivered: never to
                # count as expired or dropped), for the uplink to delete.
                self._uplink.undeleted = list(dict.fromkeys(session.done))
                await self._buffer.release_held(keep=session.done)

    def _renew_at(self, token: Token) -> float | None:
        """Loop time at which to renew the connection, or None."""
        if token.expires_at is None:
            return None
        left = token.expires_at - self.config.token.renew_before - self._uplink.clock.time()
        return asyncio.get_running_loop().time() + max(left, 1.0)

    async def _watch(self, client: aiomqtt.Client, session: Session) -> None:
        """Fail the session as soon as the connection is lost (publishes alone would not know)."""
        try:
            async for _ in client.messages:
                pass  # we subscribe to nothing
        except aiomqtt.MqttError as exc:
            cause = exc.__cause__
            rc = getattr(cause, "rc", None)
            if getattr(rc, "value", rc) == _KEEPALIVE_TIMEOUT:  # paho's: no PINGRESP in time
                session.fail(LinkDead(f"connection lost: {cause}"))
            else:
                session.fail(LinkFailure(f"connection lost: {cause or exc}"))

    async def _feed(self, client: aiomqtt.Client, session: Session) -> None:
        cursor: tuple[int, int] | None = None
        probed = False
        while True:
            session.check()
            if self._stopping.is_set():
                return
            if self._renewing(session):
                log.info("uplink: renewing the connection before the token expires")
                return
            if self._reconnect.is_set():
                log.info("uplink: reconnecting with the reloaded configuration or CRL")
                return
            free = session.window - len(session.outbox)
            if free <= 0:
                await session.wait()
                continue
            if cursor is not None and self._preempt > cursor[0]:
                # Higher-priority events arrived behind the cursor: send them first.
                self._preempt = -1
                events = await self._fetch_above(session, cursor[0], free)
                if events:
                    for message in await self._drain_order(events):
                        if not await self._send(session, message):
                            break
                    continue
            events = await self._fetch_next(session, cursor, free)
            if events and session.inflight and self._lingers(events):
                await session.wait(self.config.batch.linger)
                more = await self._fetch(session, (events[-1].priority, events[-1].seq), free)
                events += more
            now = asyncio.get_running_loop().time()
            suspect = (
                None
                if probed
                else self._suspects.candidate(
                    idle=not events,
                    now=now,
                    up_since=self._up_since,
                    patience=self._patience,
                )
            )
            if suspect is not None:
                # Held like the events read (its copy in memory goes, not a row read now): the
                # sweep must not expire it while its PUBACK is on its way.
                if not await self._buffer.hold(suspect.event.seq):
                    # Expired, dropped for room or purged since it was set aside: its copy in
                    # memory must not go up (it is counted as dropped).
                    self._suspects.forget(suspect.event.seq)
                    continue
                await self._send(session, self._messages.of([suspect.event], alone=True)[0])
                # Delivered: the next suspect may go. Not delivered (stop, reload): no other
                # probe on this connection (a lost connection ends it anyway).
                probed = suspect.event.seq in self._suspects.seqs
                continue
            if not events:
                # The renewal timer wakes it too.
                await session.wait(self._suspects.next_retry(now))
                continue
            cursor = (events[-1].priority, events[-1].seq)
            messages = await self._drain_order(events)
            # The messages carry what goes up: the page's rows (~0.5 MB per 1,000 events) need
            # not stay while they wait for room in the window and the next page is read.
            del events
            for message in messages:
                if not await self._send(session, message):
                    break

    async def _drain_order(self, events: list[StoredEvent]) -> list[Message]:
        """`Messages.drain_order`, on a worker thread when envelopes are compressed: zstd
        releases the GIL, and on the event loop a fetch of 64 KiB envelopes held it (keep-alive,
        PUBACKs, local publishers) about 6 ms per envelope at level 19, 0.4 ms at level 3."""
        if self.config.batch.zstd_level is None:
            return self._messages.drain_order(events)
        return await asyncio.to_thread(self._messages.drain_order, events)

    def _lingers(self, events: list[StoredEvent]) -> bool:
        """Whether a part-full batch waits for more: only while other messages are in flight
        (like Nagle's algorithm), so a lone event on an idle link goes at once."""
        config = self.config
        batch = config.batch
        return (
            config.envelope_version is not None
            and batch.linger > 0
            and len(events) < batch.max_events
            and not self._stopping.is_set()
        )

    def _want(self, free: int) -> int:
        """Events per fetch: enough for the free slots, and in raw mode a few windows ahead, so
        that the loop does not go to the buffer's thread for every freed slot."""
        config = self.config
        if config.envelope_version is not None:
            return min(free * config.batch.max_events, _MAX_FETCH)
        return min(max(free, config.window * 4), _MAX_FETCH)

    async def _fetch_next(
        self, session: Session, cursor: tuple[int, int] | None, free: int
    ) -> list[StoredEvent]:
        """`_fetch`, taken from the read started ahead when it was for this cursor. After a full
        page (more are likely waiting) the next page is read at once, on the buffer's thread
        while this one is sent, so the publishers do not run dry waiting for the database."""
        ahead, session.ahead = session.ahead, None
        if ahead is not None and ahead[0] == cursor:
            # `_preempt` is left as it is: an event of a higher priority than the cursor's,
            # committed while this page was read, is found by the feeder's next turn.
            events = await ahead[1]
        else:
            if ahead is not None:
                ahead[1].cancel()  # read for another cursor (a linger read more): not needed
                ahead[1].add_done_callback(drop_outcome)
            if cursor is None:
                # This read sees everything committed so far. One after the cursor does not
                # see priorities above it: a flag set meanwhile (during an empty `_fetch_above`,
                # say) must stay, or that event waits for the next connection.
                self._preempt = -1
            events = await self._fetch(session, cursor, free)
        if events and len(events) == self._want(free):
            after = (events[-1].priority, events[-1].seq)
            session.ahead = (after, asyncio.create_task(self._fetch(session, after, free)))
        return events

    async def _fetch(
        self, session: Session, cursor: tuple[int, int] | None, free: int
    ) -> list[StoredEvent]:
        """The next events after ``cursor``. Nothing after the cursor was sent on this
        connection (events are taken in cursor order), but deferred ones may be anywhere, and
        so may those of them acknowledged on this connection whose rows are not deleted yet
        (and those acknowledged on an earlier one: `settling`)."""
        sent = session.taken.keys() | session.settling if cursor is None else session.settling
        skip = frozenset(self._suspects.seqs | sent)
        return await self._buffer.next_events(
            self._want(free), cursor, skip=skip, max_bytes=self.config.window_bytes, hold=True
        )

    async def _fetch_above(self, session: Session, priority: int, free: int) -> list[StoredEvent]:
        """Not yet sent events of a priority above ``priority`` (the cursor stays where it is)."""
        want = self._want(free)
        # `settling` too: a set-aside event delivered since, its row not deleted yet, whose
        # priority in `taken` is its copy's (a reload may have raised its topic's since).
        taken_above = {s for s, p in session.taken.items() if p > priority}
        skip = frozenset(self._suspects.seqs | session.settling | taken_above)
        events = await self._buffer.next_events(
            want, None, skip=skip, max_bytes=self.config.window_bytes, above=priority, hold=True
        )
        if events:
            # More may be waiting (the page ends at `want` events or at `window_bytes`): the
            # next turn reads above the cursor again, until a read finds nothing.
            self._preempt = max(self._preempt, events[-1].priority)
        return events

    async def _send(self, session: Session, message: Message) -> bool:
        """Queue ``message`` (in drain order) for `Session.pump`. The queue holds up to a window, so
        acknowledgements are answered with the next messages without waiting for this feeder."""
        if _sent_topic_problem(message.topic) is not None and await self._unsendable(message):
            return True
        # Messages resent after one loss go in rounds of 1, 2, 4... messages, each round once
        # the one before is acknowledged: the first goes alone in flight (a poison event lost
        # with it is set aside at once), and after a cut with a full window in flight the link
        # is back to a full window within a few round trips, not one round trip per message.
        # A round lost takes its events to two attempts: alone next time. Nothing else goes
        # with a round, so that the events lost with one are only those of the round.
        if message.ramp and session.ramp_left:
            session.ramp_left -= 1
        elif message.alone or message.ramp or session.ramp_round:
            while session.inflight or session.outbox:
                await session.wait()
                if self._closing(session):
                    return False
            if message.ramp:
                session.ramp_round = min(2 * session.ramp_round or 1, session.window)
                session.ramp_left = session.ramp_round - 1
            else:
                session.ramp_round = session.ramp_left = 0
        while session.full():
            await session.wait()  # woken when there is room, a failure, stop, reload, renewal
            if self._closing(session):
                return False  # not queued, nor anything after it: the feeder returns
        if self._closing(session):
            # Asked to close while the page was read: it stays buffered. (With `config`,
            # the second guard against a reload's new format reaching this connection.)
            return False
        session.queue(message)
        if message.alone:
            while session.inflight or session.outbox:
                await session.wait()
                if self._stopping.is_set() or self._reconnect.is_set():
                    break
        return True

    async def _unsendable(self, message: Message) -> bool:
        """Dead-letter ``message``'s events if its topic cannot go up: over MQTT's limit (paho
        refuses it, and each connection failed on it for ever, holding back all behind it), or
        with a level that is or becomes ``..`` (the sink closes the link on it, each time):
        buffered before the door checked the topic the template makes, or before
        ``topic_template`` changed."""
        problem = _sent_topic_problem(message.topic)
        if problem is None:
            return False
        size = len(message.topic.encode("utf-8", errors="surrogatepass"))
        reason = (
            f"its uplink topic is {size} bytes, over MQTT's {MAX_TOPIC_BYTES}"
            if size > MAX_TOPIC_BYTES
            else f"its uplink topic {message.topic[:200]!r} cannot be sent: {problem}"
        )
        for seq in message.seqs:
            if await self._buffer.dead_letter(seq, reason):
                self.status.dead_lettered += 1
        for seq in message.seqs:
            self._suspects.forget(seq)
        log.error("uplink: %d events on %r moved to dead letters: %s",
                  len(message.seqs), message.topic[:100], reason)  # fmt: skip
        return True

    def _closing(self, session: Session) -> bool:
        """Whether the feeder should stop queueing and return: stop, reload, or the token's
        renewal (a page of large events on a slow link can take longer than ``renew_before``:
        the sink would cut the connection at ``exp``). Once this is true the feeder returns:
        what it did not queue of its page is read again on the next connection."""
        return self._stopping.is_set() or self._reconnect.is_set() or self._renewing(session)

    def _renewing(self, session: Session) -> bool:
        """Whether it is time to reconnect with a later token. Decided once per renewal time:
        without a later token (a token file not rewritten yet) the connection goes on and the
        question comes back `_TOKEN_FILE_RECHECK` seconds later."""
        if not session.renewal_due():
            return False
        if session.renewing or self._uplink.fresh_token(self._token):
            session.renewing = True
            return True
        session.schedule_renewal(_TOKEN_FILE_RECHECK)
        return False

    def _delivered(self, seqs: list[int], qos: int) -> None:
        """Seqs acknowledged on the current connection (`Session.on_delivered`)."""
        self.status.delivered += len(seqs)
        suspects = self._suspects.delivered(seqs, qos)
        if suspects and self.session is not None:
            # Their rows stay until the next delete; a read after the cursor (where a set-aside
            # event may be) must not send them again meanwhile.
            self.session.settling.update(suspects)

    async def _delete_loop(self, session: Session) -> None:
        """Delete acknowledged rows in batches: one transaction (and, with ``full`` durability,
        one fsync) per ``_DELETE_EVERY`` seconds at most, instead of one per acknowledgement. A
        row acknowledged but not yet deleted when the agent dies is sent again: harmless."""
        while True:
            if self._uplink.status_stale():
                # Delivered since link.json was written: written once the acks pause, so that
                # `status` does not show the count of the middle of a burst until the next one.
                try:
                    async with asyncio.timeout(_STATUS_EVERY):
                        await session.acked.wait()
                except TimeoutError:
                    self._uplink.write_status()
                    continue
            else:
                await session.acked.wait()
            await asyncio.sleep(_DELETE_EVERY)
            session.acked.clear()
            await self._delete_done(session)

    async def _delete_done(self, session: Session) -> None:
        seqs, session.done = session.done, []
        if seqs:
            try:
                await self._buffer.delete(seqs)
            except Exception as exc:
                session.done = seqs + session.done
                session.fail(LocalFailure(f"cannot delete delivered events from the buffer: {exc}"))
                return
            except BaseException:
                session.done = seqs + session.done  # deleted or not: delete again (idempotent)
                raise
            for seq in seqs:
                session.taken.pop(seq, None)
            session.settling.difference_update(seqs)
            self._uplink.write_status(unless_within=_STATUS_EVERY)  # keep `status` fresh

    async def _settle_inflight(self, session: Session) -> None:
        """On a planned close: wait for what is in flight (within the publish timeout)."""
        limit = self._uplink.grace if self._stopping.is_set() else self.config.publish_timeout
        session.outbox.clear()  # queued, not sent: stays buffered for the next connection
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while session.inflight:
                    await session.wait()

    async def _finish(self, session: Session, graceful: bool) -> None:
        """Delete what was acknowledged; count an attempt for what was in flight on a failure."""
        await self._delete_done(session)
        lost = [seq for message in session.inflight.values() for seq in message.seqs]
        if graceful or not lost or session.failure is None:
            return
        await self._buffer.record_attempt(lost)
        if len(session.inflight) != 1 or isinstance(session.failure, LocalFailure):
            # Our own failure (the buffer's) says nothing about the event alone in flight: a
            # suspect stays as it was, any other is sent again with the rest.
            return
        event = next(iter(session.inflight.values())).single
        if event is None:
            return
        failures = self._suspects.lost(
            event,
            # Not the server closing on it: our publish timeout, or a link gone silent (a
            # blackhole; or a path that drops the large packet and everything behind it, which
            # must not hold the backlog back either, so the event is still set aside).
            closed=not isinstance(session.failure, (PublishTimeout, LinkDead)),
            publish_timeout=self.config.publish_timeout,
            now=asyncio.get_running_loop().time(),
            silent=isinstance(session.failure, LinkDead),
        )
        if failures is None:
            return
        if failures < self._uplink.config.max_attempts:
            await self._buffer.record_losses(event.seq, failures)  # kept across restarts
            return
        reason = (
            f"the connection was lost {failures} times with this event alone in flight, "
            f"other events getting through in between (last: {session.failure.detail})"
        )
        if await self._buffer.dead_letter(event.seq, reason):
            self.status.dead_lettered += 1
            log.error("uplink: event seq %d on %r moved to dead letters: %s",
                      event.seq, event.topic[:100], reason)  # fmt: skip
        self._suspects.forget(event.seq)  # moved, or no longer buffered


@functools.lru_cache(maxsize=4096)
def _sent_topic_problem(topic: str) -> str | None:
    """`topic_problem` of an uplink topic, cached: one look-up per message on the drain."""
    return topic_problem(topic)
