"""The uplink: drains the buffer to the sink (or any MQTT broker) over mutual TLS (SPEC §5).

One connection at a time, a fresh aiomqtt client per attempt. On a connection the drain reads
the buffer in drain order (priority, then seq), groups events into MQTT messages (one event per
message in ``raw`` format; consecutive events of one topic per batch envelope in ``batch-v1``)
and keeps up to ``window`` messages in flight. An event's row is deleted only once its message
was acknowledged (PUBACK / PUBCOMP; QoS 0: written to the socket). Anything else (a timeout, a
lost connection, an exception) means "outcome unknown": the row stays and is sent again on the
next connection, which the event id makes harmless at the sink.

Failures:

- Transient (connection refused or lost, timeouts, the sink saying "server unavailable"):
  reconnect after an exponential backoff with full jitter, capped; reset once a connection has
  been up ``stable_after``.
- Refused credentials (bad token, certificate refused by the server or by us, token file
  missing or expired): state ``refused``, logged once per distinct reason, retried slowly.
- Poison events: when a connection is lost with messages in flight, their events get an attempt
  recorded. An event with one attempt is resent in a message alone in flight; with more, in a
  message of its own. When a connection is lost with an event alone in flight (sent alone, or
  simply the only message in flight), it is set aside and tried again (alone) once other events
  got through since, or at once when there is nothing else to send; after ``max_attempts`` such
  losses, each but the first with other events getting through since the previous one, it is
  moved to the dead-letter table (`edge-agent buffer requeue-dead` puts it back). The losses
  that count are kept in the buffer, so restarts do not start them over. If nothing
  else gets through, nothing is dead-lettered: that is a broken link or configuration, not a
  poison event, and the event stays buffered.

Tokens: ``device-signed`` tokens are minted per connection; the connection is renewed (drained,
closed, reopened with a fresh token) ``renew_before`` its expiry, so the sink never has to close
it at ``exp``. A ``token-file`` token is re-read on every connection and when the file changes.

The link state is kept in ``<data_dir>/link.json`` (rewritten on every state change, read by
``edge-agent status``) and logged, one line per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import os
import ssl
import time

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError

from edge_agent.accept import MAX_TOPIC_BYTES
from edge_agent.buffer import Buffer, StoredEvent
from edge_agent.config import AgentConfig, UplinkConfig
from edge_agent.link import (
    LINK_FILE,
    LinkDead,
    LinkFailure,
    LinkState,
    LinkStatus,
    PublishTimeout,
    SendProgress,
    classify,
    limit_unsent,
    recording_socket_class,
)
from edge_agent.messages import Message, Messages
from edge_agent.suspects import MAX_SUSPECTS, Suspects
from edge_agent.tls import DeviceTls, TlsMaterial
from edge_agent.token import Token, TokenSource, TokenUnavailable, token_source
from edge_agent.window import Session
from mqtt_ingest.backoff import Backoff
from mqtt_ingest.clock import Clock
from mqtt_ingest.envelope import FORMAT_BATCH_V1, MAX_EVENTS, format_username
from mqtt_ingest.lifecycle import drop_outcome

__all__ = ["Uplink"]

log = logging.getLogger(__name__)

_MAX_FETCH = MAX_EVENTS  # events per read from the buffer (more only holds more rows in memory)
_DELETE_EVERY = 0.02  # seconds: acknowledged rows are deleted in batches
_STATUS_EVERY = 2.0  # seconds between link.json refreshes while events flow
_KEEPALIVE_TIMEOUT = 141  # the reason code paho gives a link that missed its keep-alive
_TOKEN_FILE_RECHECK = 30.0  # seconds: a token file still unchanged at renewal is looked at again
# Client id rejected, bad user name or password, not authorized: MQTT 3.1.1 codes and the MQTT 5
# reason codes paho reports them as.
_REFUSED_CONNACK = frozenset({2, 4, 5, 133, 134, 135})
CRL_CHECK_INTERVAL = 5.0  # seconds between looks at [uplink.tls] crl (the sink polls its own too)


class Uplink:
    def __init__(self, config: AgentConfig, buffer: Buffer, clock: Clock) -> None:
        if config.uplink is None:
            raise ValueError("no [uplink] in the configuration")
        self.config: UplinkConfig = config.uplink
        # A connection's messages, built with the settings it was opened with (`_opened_with`).
        self._messages = Messages(config.uplink, config.agent.device_id, buffer.epoch)
        self.device_id = config.agent.device_id
        self._data_dir = config.agent.data_dir
        self._buffer = buffer
        self._clock = clock
        self._tokens: TokenSource = token_source(self.config, self.device_id, clock)
        self._tls = DeviceTls(self.config)
        self._reconnect = asyncio.Event()  # set by reload: close gracefully, connect again now
        self._backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        self._refused_backoff = Backoff(
            self.config.refused_backoff_initial, self.config.refused_backoff_max
        )
        self.status = LinkStatus(
            LinkState.CONNECTING,
            clock.time(),
            server=f"{self.config.host}:{self.config.port}",
        )
        self._last_refusal = ""
        self._status_written = 0.0
        self._written_counts = (0, 0)  # delivered, dead-lettered as link.json has them
        self._session: Session | None = None
        self._wake = asyncio.Event()
        self._preempt = -1  # highest priority committed since the last fetch
        self._stopping = asyncio.Event()
        self._grace = self.config.publish_timeout
        self._suspects = Suspects()  # lost alone in flight: poison, or a dead link?
        self._received_at = [time.monotonic()]  # when the current connection last received bytes
        self._told_same_token = False  # the token file's unchanged token was logged
        self._connected_with = Token(None, None)  # the token the current connection presented

    @property
    def _opened_with(self) -> UplinkConfig:
        """The settings the current (or last) connection was opened with: `reload` replaces
        `config` for the next connection, while this one finishes with what it announced at
        CONNECT (the format above all: a raw message on a batch-v1 connection would be
        dead-lettered). Its messages are built with them."""
        return self._messages.config

    @property
    def in_flight(self) -> int:
        """MQTT messages sent on the current connection and not acknowledged yet."""
        return len(self._session.inflight) if self._session is not None else 0

    # -- notifications ----------------------------------------------------------------------

    def committed(self, priority: int) -> None:
        """New events were committed (called by the acceptance path)."""
        self._preempt = max(self._preempt, priority)
        self._wake.set()
        if self._session is not None:
            self._session.changed.set()

    def _request_reconnect(self) -> None:
        """End the connection gracefully (or a back-off) and connect again at once."""
        self._reconnect.set()
        self._wake.set()
        if self._session is not None:
            self._session.changed.set()  # an idle feeder waits on this, not on _wake

    def stop(self, grace: float) -> None:
        """Stop sending; wait up to ``grace`` for what is in flight, then close (`run` returns)."""
        self._grace = grace
        self._stopping.set()
        self._wake.set()
        if self._session is not None:
            self._session.changed.set()

    # -- the connection loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, drain, reconnect, until `stop` (or cancellation)."""
        watcher = asyncio.create_task(self._watch_crl(), name="uplink.crl")
        try:
            try:
                self._suspects.remember(*await self._buffer.suspects(MAX_SUSPECTS))
            except Exception:
                # A flaky disk: poison counts start over, which delays a dead letter, no more.
                log.exception("uplink: cannot read the poison counts kept in the buffer")
            while not self._stopping.is_set():
                try:
                    await self._connection()
                except LinkFailure as failure:
                    if self._stopping.is_set():
                        break
                    await self._back_off(failure)
                except Exception as exc:
                    # A buffer read or write failing (a flaky SD card, a full disk while an
                    # attempt is counted), or a bug: this connection ends, the events stay
                    # buffered, and the agent keeps accepting; ending this task would stop the
                    # whole agent, its local listener with it.
                    log.exception("uplink: unexpected error, reconnecting after a back-off")
                    if self._stopping.is_set():
                        break
                    await self._back_off(LinkFailure(f"internal error: {exc!r}"))
                else:
                    self._backoff.reset()  # renewed or stopped on purpose
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            self._set_state(LinkState.STOPPED, "")

    async def _back_off(self, failure: LinkFailure) -> None:
        backoff = self._refused_backoff if failure.refused else self._backoff
        if failure.refused:
            self._backoff.reset()
        else:
            self._refused_backoff.reset()
        delay = backoff.next_delay()
        self.status.failures += 1
        self.status.last_error = failure.detail
        state = LinkState.REFUSED if failure.refused else LinkState.BACKOFF
        self.status.retry_at = self._clock.time() + delay
        quiet = failure.refused and failure.detail == self._last_refusal
        self._last_refusal = failure.detail if failure.refused else ""
        self._set_state(state, failure.detail, quiet=quiet)
        if not quiet:
            log.warning(
                "uplink: %s: %s; retrying in %.1fs%s",
                "refused" if failure.refused else "link down",
                failure.detail,
                delay,
                " (and slowly while this lasts; logged once)" if failure.refused else "",
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await _first(self._stopping, self._reconnect)
        self.status.retry_at = None

    async def _connection(self) -> None:
        config = self.config
        self._messages = Messages(config, self.device_id, self._buffer.epoch)
        self._set_state(LinkState.CONNECTING, "", quiet=True)
        self._reconnect.clear()
        material = self._tls.current(self._clock.time())
        self.status.certificate_not_after = material.not_after
        try:
            token = self._tokens.current()
        except TokenUnavailable as exc:
            raise LinkFailure(str(exc), refused=True) from None
        self.status.token_expires_at = token.expires_at
        tls_errors: list[str] = []
        sockets: list[ssl.SSLSocket] = []  # this attempt's, closed when it ends
        self._received_at = [time.monotonic()]
        context = material.context
        context.sslsocket_class = recording_socket_class(tls_errors, sockets, self._received_at)
        username = (
            format_username(self.device_id, format=FORMAT_BATCH_V1)
            if config.format == FORMAT_BATCH_V1
            else self.device_id
        )
        client = aiomqtt.Client(
            config.host,
            config.port,
            identifier=self.device_id,
            username=username if token.value is not None or config.format != "raw" else None,
            password=token.value,
            tls_context=context,
            keepalive=config.keepalive,
            timeout=config.connect_timeout,
            clean_session=True,
            max_inflight_messages=0,  # the window is ours (paho's own limit scans per PUBACK)
            logger=logging.getLogger("edge_agent.uplink.mqtt"),
        )
        connected_at: float | None = None
        try:
            async with client:
                connected_at = asyncio.get_running_loop().time()
                self.status.connections += 1
                self.status.connected_since = self._clock.time()
                self._last_refusal = ""
                # Accepted: a later refusal is a new story and starts its slow back-off over
                # (it went on from where earlier refusals had left it, up to the maximum).
                self._refused_backoff.reset()
                self._set_state(LinkState.ONLINE, _token_note(token, self._clock))
                await self._drain(client, token)
        except MqttConnectError as exc:
            code = getattr(exc.rc, "value", exc.rc)
            raise LinkFailure(f"CONNACK refused: {exc}", refused=code in _REFUSED_CONNACK) from None
        except aiomqtt.MqttError as exc:
            raise classify(str(exc), tls_errors) from None
        except OSError as exc:
            raise classify(str(exc), tls_errors) from None
        finally:
            # After a failed connect (a CONNACK timeout) paho still holds its socket and aiomqtt
            # still watches it: let paho close it, which unregisters it from the loop (a closed
            # descriptor left registered breaks the next attempt that gets the same number) and
            # ends aiomqtt's housekeeping task. A no-op once the connection was closed.
            with contextlib.suppress(Exception):
                client._client._sock_close()
            for sock in sockets:
                sock.close()  # paho leaves the socket of a connect that failed after the handshake
            self.status.connected_since = None
            # Up that long, not merely that long since the attempt began: a connect that took
            # its whole connect_timeout (as long as stable_after or more) reset the back-off.
            now = asyncio.get_running_loop().time()
            if connected_at is not None and now - connected_at >= config.stable_after:
                self._backoff.reset()

    def _renew_at(self, token: Token) -> float | None:
        """Loop time at which to renew the connection, or None."""
        if token.expires_at is None:
            return None
        left = token.expires_at - self._opened_with.token.renew_before - self._clock.time()
        return asyncio.get_running_loop().time() + max(left, 1.0)

    async def _watch_crl(self) -> None:
        """Look at the CRL file every `CRL_CHECK_INTERVAL` seconds (`DeviceTls.crl_changed`)."""
        while True:
            await asyncio.sleep(CRL_CHECK_INTERVAL)
            if self._tls.crl_changed():
                self._request_reconnect()

    def reload(self, config: UplinkConfig) -> None:
        """Use new settings, certificates, key and token from the next connection on, which
        starts at once. Everything is loaded and checked first: on a problem this raises
        ValueError and the uplink keeps what it had."""
        material = TlsMaterial.load(config)
        rollback = self._tls.rollback(material, config.tls.ca)
        if rollback is not None:
            raise ValueError(f"the CRL {config.tls.crl} is older than the one in use: {rollback}")
        tokens = token_source(config, self.device_id, self._clock)
        try:
            tokens.current()
        except TokenUnavailable as exc:
            raise ValueError(str(exc)) from None
        self.config = config
        self._tls = DeviceTls(config, material)
        self._tokens = tokens
        self.status.server = f"{config.host}:{config.port}"
        self._backoff = Backoff(config.backoff_initial, config.backoff_max)
        self._refused_backoff = Backoff(config.refused_backoff_initial, config.refused_backoff_max)
        self._last_refusal = ""
        self._request_reconnect()
        if self._session is not None:
            self._session.changed.set()

    # -- one connection's drain -------------------------------------------------------------

    async def _drain(self, client: aiomqtt.Client, token: Token) -> None:
        self._connected_with = token
        # Messages go straight to paho, acknowledgements come back through its callback: no
        # task, future or timer per message (aiomqtt's `publish` costs about as much again as
        # paho's own work). aiomqtt still owns the connection, its loop and its failures.
        mqtt: paho.Client = client._client  # aiomqtt 2.x: its paho client
        config = self._opened_with
        session = Session(
            config.window, config.window_bytes, config.publish_timeout, mqtt, self._delivered
        )
        # paho pings after `keepalive` s without inbound bytes and gives up `keepalive` s after
        # that (checked once a second): up to 2 x keep-alive + 1 s. A healthy link answers each
        # ping at once, so inbound silence of 1.5 x keep-alive (and at least keep-alive + 2 s,
        # for paho's once-a-second check) means a dead link (RELIABILITY F5).
        session.silence_limit = max(1.5 * config.keepalive, config.keepalive + 2.0)
        session.received_at = self._received_at
        session.progress = SendProgress(
            mqtt, self._received_at, grace=session.silence_limit - config.keepalive
        ).moved
        limit_unsent(mqtt.socket())
        session.renew_at = self._renew_at(token)
        session.schedule_renewal()
        self._session = session

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
            self._session = None
            session.close()
            mqtt.on_publish = None  # a late acknowledgement is not counted: the row is resent
            session.outbox.clear()
            if session.ahead is not None:
                session.tasks.append(session.ahead[1])
            for task in session.tasks:
                task.cancel()
            await asyncio.gather(*session.tasks, return_exceptions=True)
            await self._finish(session, graceful)

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
                    for message in self._messages.drain_order(events):
                        if not await self._send(session, message):
                            break
                    continue
            events = await self._fetch_next(session, cursor, free)
            if events and session.inflight and self._lingers(events):
                await session.wait(self._opened_with.batch.linger)
                more = await self._fetch(session, (events[-1].priority, events[-1].seq), free)
                events += more
            now = asyncio.get_running_loop().time()
            suspect = None if probed else self._suspects.candidate(idle=not events, now=now)
            if suspect is not None:
                if not await self._buffer.holds(suspect.event.seq):
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
            for message in self._messages.drain_order(events):
                if not await self._send(session, message):
                    break

    def _lingers(self, events: list[StoredEvent]) -> bool:
        """Whether a part-full batch waits for more: only while other messages are in flight
        (like Nagle's algorithm), so a lone event on an idle link goes at once."""
        config = self._opened_with
        batch = config.batch
        return (
            config.format == FORMAT_BATCH_V1
            and batch.linger > 0
            and len(events) < batch.max_events
            and not self._stopping.is_set()
        )

    def _want(self, free: int) -> int:
        """Events per fetch: enough for the free slots, and in raw mode a few windows ahead, so
        that the loop does not go to the buffer's thread for every freed slot."""
        config = self._opened_with
        if config.format == FORMAT_BATCH_V1:
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
        so may those of them acknowledged on this connection whose rows are not deleted yet."""
        sent = session.taken.keys() if cursor is None else session.settling
        skip = frozenset(self._suspects.seqs | sent)
        return await self._buffer.next_events(
            self._want(free), cursor, skip=skip, max_bytes=self._opened_with.window_bytes
        )

    async def _fetch_above(self, session: Session, priority: int, free: int) -> list[StoredEvent]:
        """Not yet sent events of a priority above ``priority`` (the cursor stays where it is)."""
        want = self._want(free)
        skip = frozenset(
            self._suspects.seqs | {s for s, p in session.taken.items() if p > priority}
        )
        events = await self._buffer.next_events(
            want, None, skip=skip, max_bytes=self._opened_with.window_bytes, above=priority
        )
        if events:
            # More may be waiting (the page ends at `want` events or at `window_bytes`): the
            # next turn reads above the cursor again, until a read finds nothing.
            self._preempt = max(self._preempt, events[-1].priority)
        return events

    async def _send(self, session: Session, message: Message) -> bool:
        """Queue ``message`` (in drain order) for `Session.pump`. The queue holds up to a window, so
        acknowledgements are answered with the next messages without waiting for this feeder."""
        if len(message.topic) > MAX_TOPIC_BYTES // 4 and await self._unsendable(message):
            return True
        if message.alone:
            while session.inflight or session.outbox:
                await session.wait()
                if self._closing(session):
                    return False
        while session.full():
            await session.wait()  # woken when there is room, a failure, stop, reload, renewal
            if self._closing(session):
                return False  # not queued, nor anything after it: the feeder returns
        if self._closing(session):
            # Asked to close while the page was read: it stays buffered. (With `_opened_with`,
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
        """Dead-letter ``message``'s events if its topic is over MQTT's limit (paho refuses it,
        and each connection failed on it for ever, holding back all behind it): buffered before
        the acceptance check knew of the uplink's prefix, or before ``topic_template`` grew."""
        size = len(message.topic.encode("utf-8", errors="surrogatepass"))
        if size <= MAX_TOPIC_BYTES:
            return False
        reason = f"its uplink topic is {size} bytes, over MQTT's {MAX_TOPIC_BYTES}"
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
        if session.renewing or self._fresh_token(self._connected_with):
            session.renewing = True
            return True
        session.schedule_renewal(_TOKEN_FILE_RECHECK)
        return False

    def _fresh_token(self, connected_with: Token) -> bool:
        """Whether a new connection would present a later token. Always, with device-signed
        tokens (minted per connection); with a token file, only once it holds a new one:
        reconnecting with the same token would only repeat itself every second until ``exp``."""
        try:
            fresh = self._tokens.current()
        except TokenUnavailable:
            return False
        later = (fresh.expires_at or math.inf) > (connected_with.expires_at or math.inf)
        if fresh.value != connected_with.value and later:
            self._told_same_token = False
            return True
        if not self._told_same_token:
            self._told_same_token = True
            log.warning(
                "uplink: the token file still holds the token that expires at %s; keeping this"
                " connection until a new token is written (the server closes it at expiry)",
                _when(connected_with.expires_at),
            )
        return False

    def _delivered(self, seqs: list[int], qos: int) -> None:
        """Seqs acknowledged on the current connection (`Session.on_delivered`)."""
        self.status.delivered += len(seqs)
        suspects = self._suspects.delivered(seqs, qos)
        if suspects and self._session is not None:
            # Their rows stay until the next delete; a read after the cursor (where a set-aside
            # event may be) must not send them again meanwhile.
            self._session.settling.update(suspects)

    async def _delete_loop(self, session: Session) -> None:
        """Delete acknowledged rows in batches: one transaction (and, with ``full`` durability,
        one fsync) per ``_DELETE_EVERY`` seconds at most, instead of one per acknowledgement. A
        row acknowledged but not yet deleted when the agent dies is sent again: harmless."""
        while True:
            if self._written_counts != self._counts():
                # Delivered since link.json was written: written once the acks pause, so that
                # `status` does not show the count of the middle of a burst until the next one.
                try:
                    async with asyncio.timeout(_STATUS_EVERY):
                        await session.acked.wait()
                except TimeoutError:
                    self._write_status()
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
                session.fail(LinkFailure(f"cannot delete delivered events from the buffer: {exc}"))
                return
            except BaseException:
                session.done = seqs + session.done  # deleted or not: delete again (idempotent)
                raise
            for seq in seqs:
                session.taken.pop(seq, None)
            session.settling.difference_update(seqs)
            if asyncio.get_running_loop().time() - self._status_written >= _STATUS_EVERY:
                self._write_status()  # keep the delivered count in `status` fresh

    async def _settle_inflight(self, session: Session) -> None:
        """On a planned close: wait for what is in flight (within the publish timeout)."""
        limit = self._grace if self._stopping.is_set() else self._opened_with.publish_timeout
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
        if len(session.inflight) != 1:
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
            publish_timeout=self._opened_with.publish_timeout,
            now=asyncio.get_running_loop().time(),
            silent=isinstance(session.failure, LinkDead),
        )
        if failures is None:
            return
        if failures < self.config.max_attempts:
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

    # -- link state -------------------------------------------------------------------------

    def _set_state(self, state: LinkState, detail: str, *, quiet: bool = False) -> None:
        changed = state != self.status.state or detail != self.status.detail
        if changed:
            self.status.state = state
            self.status.since = self._clock.time()
            self.status.detail = detail
        if state is LinkState.ONLINE and not quiet:
            log.info("uplink: online to %s (%s)", self.status.server, detail)
        if changed or state is LinkState.BACKOFF:
            self._write_status()

    def _counts(self) -> tuple[int, int]:
        return self.status.delivered, self.status.dead_lettered

    def _write_status(self) -> None:
        self._status_written = asyncio.get_running_loop().time()
        counts = self._counts()
        path = self._data_dir / LINK_FILE
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(self.status.to_json())
            os.replace(temporary, path)
        except OSError as exc:
            log.debug("uplink: cannot write %s: %s", path, exc)
        else:
            self._written_counts = counts  # what link.json has (a failed write is tried again)


async def _first(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _token_note(token: Token, clock: Clock) -> str:
    if token.expires_at is None:
        return "token without expiry" if token.value is not None else "no token"
    return f"token expires in {max(0, int(token.expires_at - clock.time()))}s"


def _when(unix: float | None) -> str:
    if unix is None:
        return "never"
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
