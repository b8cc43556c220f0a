"""The uplink: drains the buffer to the sink (or any MQTT broker) over mutual TLS (SPEC §5).

One connection at a time, a fresh aiomqtt client per attempt. On a connection the drain reads
the buffer in drain order (priority, then seq), groups events into MQTT messages (one event per
message in ``raw`` format; consecutive events of one topic per batch envelope in ``batch-v2``)
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
  recorded. Events with one attempt are resent first, in rounds of 1, 2, 4... messages in
  flight, each once the one before is acknowledged; with more, each in a message of its own,
  alone in flight. When a connection is lost with an event alone in flight (sent alone, or
  simply the only message in flight), it is set aside and tried again (alone) once other events
  got through since; at once when there is nothing else to send; or once the connection has
  been up ``stable_after`` (at least the silence limit) since its loss, doubling with each
  uncounted close on it (QoS 0 traffic proves nothing, and may never be idle); after
  ``max_attempts`` such
  losses, each but the first with other events getting through since the previous one, it is
  moved to the dead-letter table (`edge-agent buffer requeue-dead` puts it back). The losses
  that count are kept in the buffer, so restarts do not start them over. If nothing
  else gets through, nothing is dead-lettered: that is a broken link or configuration, not a
  poison event, and the event stays buffered.

Tokens: ``device-signed`` tokens are minted per connection; the connection is renewed (drained,
closed, reopened with a fresh token) ``renew_before`` its expiry, so the sink never has to close
it at ``exp``. A ``token-file`` token is re-read on every connection and when the file changes;
a change during a back-off ends it (a fixed token file is used at once).

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
from aiomqtt.exceptions import MqttConnectError

from edge_agent.buffer import Buffer
from edge_agent.config import AgentConfig, UplinkConfig
from edge_agent.connection_drain import ConnectionDrain
from edge_agent.link import (
    LINK_FILE,
    LinkFailure,
    LinkState,
    LinkStatus,
    classify,
    recording_socket_class,
    token_note,
)
from edge_agent.messages import Messages
from edge_agent.suspects import MAX_SUSPECTS, Suspects
from edge_agent.tls import DeviceTls, TlsMaterial
from edge_agent.token import Token, TokenSource, TokenUnavailable, token_source
from mqtt_ingest.backoff import Backoff
from mqtt_ingest.clock import Clock

__all__ = ["Uplink"]

log = logging.getLogger(__name__)

# Client id rejected, bad user name or password, not authorized: MQTT 3.1.1 codes and the MQTT 5
# reason codes paho reports them as.
_REFUSED_CONNACK = frozenset({2, 4, 5, 133, 134, 135})
# seconds between looks at [uplink.tls] crl (the sink polls its own too) and the token file
CRL_CHECK_INTERVAL = 5.0


class Uplink:
    def __init__(self, config: AgentConfig, buffer: Buffer, clock: Clock) -> None:
        if config.uplink is None:
            raise ValueError("no [uplink] in the configuration")
        self.config: UplinkConfig = config.uplink
        # The current (or last) connection's messages, built with the settings it was opened
        # with (`ConnectionDrain.config`).
        self.messages = Messages(config.uplink, config.agent.device_id, buffer.epoch)
        self.device_id = config.agent.device_id
        self._data_dir = config.agent.data_dir
        self.buffer = buffer
        self.clock = clock
        self._tokens: TokenSource = token_source(self.config, self.device_id, clock)
        self._tls = DeviceTls(self.config)
        self.reconnecting = asyncio.Event()  # set by reload: close gracefully, connect again now
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
        self._drain: ConnectionDrain | None = None  # the current connection's
        self.stopping = asyncio.Event()
        self.grace = self.config.publish_timeout  # for what is in flight at stop
        self.suspects = Suspects()  # lost alone in flight: poison, or a dead link?
        self.undeleted: list[int] = []
        """Seqs acknowledged on the last connection whose rows it could not delete (a full
        disk, F7): delivered, they stay held in the buffer (never swept nor dropped) until a
        delete succeeds: before the next attempt to connect, or that connection's first."""
        self._received_at = [time.monotonic()]  # when the current connection last received bytes
        self._told_same_token = False  # the token file's unchanged token was logged

    @property
    def in_flight(self) -> int:
        """MQTT messages sent on the current connection and not acknowledged yet."""
        return self._drain.in_flight if self._drain is not None else 0

    # -- notifications ----------------------------------------------------------------------

    def committed(self, priority: int) -> None:
        """New events were committed (called by the acceptance path)."""
        if self._drain is not None:
            self._drain.committed(priority)

    def priorities_changed(self) -> None:
        """Buffered events took new priorities: a connection that read events at their old ones
        ends gracefully and the next one reads afresh, highest first. What it had taken and its
        cursor are by the old ones: events in flight were read again at their new priority and
        sent twice (raw mode: nothing dedupes), when no reload's reconnect ended it (a reload
        that also removed [uplink]) or it began before the priorities changed."""
        if self._drain is not None:
            log.info("uplink: buffered events took new priorities; connecting again")
            self._request_reconnect()

    def _request_reconnect(self) -> None:
        """End the connection gracefully (or a back-off) and connect again at once."""
        self.reconnecting.set()
        if self._drain is not None:
            self._drain.wake()

    def stop(self, grace: float) -> None:
        """Stop sending; wait up to ``grace`` for what is in flight, then close (`run` returns)."""
        self.grace = grace
        self.stopping.set()
        if self._drain is not None:
            self._drain.wake()

    # -- the connection loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, drain, reconnect, until `stop` (or cancellation)."""
        watcher = asyncio.create_task(self._watch_files(), name="uplink.files")
        try:
            try:
                self.suspects.remember(*await self.buffer.suspects(MAX_SUSPECTS))
            except Exception:
                # A flaky disk: poison counts start over, which delays a dead letter, no more.
                log.exception("uplink: cannot read the poison counts kept in the buffer")
            while not self.stopping.is_set():
                await self._delete_undeleted()
                try:
                    await self._connection()
                except LinkFailure as failure:
                    if self.stopping.is_set():
                        break
                    await self._back_off(failure)
                except Exception as exc:
                    # A buffer read or write failing (a flaky SD card, a full disk while an
                    # attempt is counted), or a bug: this connection ends, the events stay
                    # buffered, and the agent keeps accepting; ending this task would stop the
                    # whole agent, its local listener with it.
                    log.exception("uplink: unexpected error, reconnecting after a back-off")
                    if self.stopping.is_set():
                        break
                    await self._back_off(LinkFailure(f"internal error: {exc!r}"))
                else:
                    self._backoff.reset()  # renewed or stopped on purpose
            await self._delete_undeleted()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            self._set_state(LinkState.STOPPED, "")

    async def _delete_undeleted(self) -> None:
        """Delete the rows of `undeleted`, if any: without waiting for a connection (the sink
        may be out of reach for long, and held rows never expire)."""
        if not self.undeleted:
            return
        try:
            await self.buffer.delete(self.undeleted)
        except Exception as exc:
            log.warning(
                "uplink: cannot delete %d delivered events from the buffer yet: %s",
                len(self.undeleted),
                exc,
            )
            return
        self.undeleted = []

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
        self.status.retry_at = self.clock.time() + delay
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
                await _first(self.stopping, self.reconnecting)
        self.status.retry_at = None

    async def _connection(self) -> None:
        config = self.config
        self.messages = Messages(config, self.device_id, self.buffer.epoch)
        self.reconnecting.clear()
        shown = self.status.certificate_not_after, self.status.token_expires_at
        try:
            material = self._tls.current(self.clock.time())
        except LinkFailure:
            # Refused (expired, not yet valid, CRL past its update): the certificate's expiry
            # is still what the metrics and `status` must show, to alert on.
            if self._tls.material is not None:
                self.status.certificate_not_after = self._tls.material.not_after
            raise
        self.status.certificate_not_after = material.not_after
        try:
            token = self._tokens.current()
        except TokenUnavailable as exc:
            raise LinkFailure(str(exc), refused=True) from None
        self.status.token_expires_at = token.expires_at
        # In link.json with the state: `status` shows them as in use (after a restart with a
        # new certificate it showed the last run's until the attempt ended).
        if self.status.state is not LinkState.CONNECTING:
            self._set_state(LinkState.CONNECTING, "", quiet=True)
        elif shown != (material.not_after, token.expires_at):
            self.write_status()
        tls_errors: list[str] = []
        sockets: list[ssl.SSLSocket] = []  # this attempt's, closed when it ends
        self._received_at = [time.monotonic()]
        context = material.context
        context.sslsocket_class = recording_socket_class(tls_errors, sockets, self._received_at)
        username = config.username(self.device_id)
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
                self.status.connected_since = self.clock.time()
                self._last_refusal = ""
                # Accepted: a later refusal is a new story and starts its slow back-off over
                # (it went on from where earlier refusals had left it, up to the maximum).
                self._refused_backoff.reset()
                self._set_state(LinkState.ONLINE, _token_note(token, self.clock))
                self._drain = ConnectionDrain(self, client, token, self._received_at)
                try:
                    await self._drain.run()
                finally:
                    self._drain = None
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

    async def _watch_files(self) -> None:
        """Look at the CRL file and the token file every `CRL_CHECK_INTERVAL` seconds. A new
        CRL renews the connection (`DeviceTls.crl_changed`). A token file changed since it was
        read ends a back-off: a fresh token written while the link is refused (an expired one in
        the file) is used at once, not after the slow back-off (up to `refused_backoff_max`).
        Online, a new token file waits for the renewal (`fresh_token`)."""
        while True:
            await asyncio.sleep(CRL_CHECK_INTERVAL)
            if self._tls.crl_changed():
                self._request_reconnect()
            elif self.status.retry_at is not None and self._tokens.changed():
                log.info("uplink: the token file changed; connecting again now")
                self._request_reconnect()

    def reload(self, config: UplinkConfig) -> None:
        """Use new settings, certificates, key and token from the next connection on, which
        starts at once. Everything is loaded and checked first: on a problem this raises
        ValueError and the uplink keeps what it had."""
        material = TlsMaterial.load(config)
        refusal = self._tls.rotation_refusal(material, config, self.device_id, self.clock.time())
        if refusal is not None:
            raise ValueError(refusal)
        rollback = self._tls.rollback(material, config.tls.ca)
        if rollback is not None:
            raise ValueError(f"the CRL {config.tls.crl} is older than the one in use: {rollback}")
        tokens = token_source(config, self.device_id, self.clock)
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

    def fresh_token(self, connected_with: Token) -> bool:
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

    # -- link state -------------------------------------------------------------------------

    def _set_state(self, state: LinkState, detail: str, *, quiet: bool = False) -> None:
        changed = state != self.status.state or detail != self.status.detail
        if changed:
            self.status.state = state
            self.status.since = self.clock.time()
            self.status.detail = detail
        if state is LinkState.ONLINE and not quiet:
            log.info("uplink: online to %s (%s)", self.status.server, detail)
        if changed or state in (LinkState.BACKOFF, LinkState.REFUSED):
            # Each back-off has its retry_at and failure count: a refusal before the state went
            # to connecting (the token or TLS material while loading) is the same state again.
            self.write_status()

    def _counts(self) -> tuple[int, int]:
        return self.status.delivered, self.status.dead_lettered

    def status_stale(self) -> bool:
        """Whether events were delivered or dead-lettered since link.json was written."""
        return self._written_counts != self._counts()

    def write_status(self, *, unless_within: float = 0.0) -> None:
        """Rewrite link.json (unless it was written less than ``unless_within`` seconds ago)."""
        now = asyncio.get_running_loop().time()
        if unless_within and now - self._status_written < unless_within:
            return
        self._status_written = now
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
    return token_note(token.expires_at, clock.time())


def _when(unix: float | None) -> str:
    if unix is None:
        return "never"
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
