"""The NATS JetStream core queue (SPEC §3): one message per event, confirmed by its PubAck.

Each event goes to ``<subject_prefix>.<topic with / as .>`` with ``Nats-Msg-Id`` = event id, so the
stream's duplicate window turns a resend after a lost ack into a counted duplicate, not a second
copy. Metadata travels as headers; the body is the payload unchanged. Dead letters go to a second
stream under ``<dead_letter_subject_prefix>.<device id>`` with their reason.

Connection policy: nats-py keeps reconnecting in the background (disconnects are logged, never
silent), but a publish never waits for it: it fails at once while disconnected, and any batch
whose every PubAck has not arrived within ``timeout`` raises `BackendError`. Resending is safe
thanks to ``Nats-Msg-Id``; a disconnect fails every batch still waiting at once. Every
nats-py exception is translated to `BackendError` here.

nats-py sets the connection and the streams up; batches are published by
`cloud_sink.backends.nats_batch.BatchPublisher`, which does nats-py's per-message publish
bookkeeping once per batch (most of the sink's CPU per event with NATS; docs/benchmarks.md,
"Sink").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig

from cloud_sink.backends.base import (
    BackendError,
    CoreMessage,
    DeadLetterMessage,
    PublishOutcome,
    redacted_url,
    subject_prefix_problem,
    subject_prefixes_overlap,
)
from cloud_sink.backends.nats_batch import AckClient, BatchPublisher, PublishRefused
from cloud_sink.backends.nats_streams import check_stream, removals, subject_covers

__all__ = ["NatsCoreQueue", "event_subject", "subject_covers"]

log = logging.getLogger(__name__)

_RECONNECT_WAIT = 2  # seconds between reconnect attempts in the background
_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, nats.errors.Error)
_PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*_ERRORS, PublishRefused)
_UNSAFE_TOKEN_CHARS = frozenset(".*>%") | frozenset(chr(c) for c in range(0x21))
_NEWLINES_AS_SPACES = str.maketrans({"\r": " ", "\n": " "})
# nats-server's default max_control_line is 4096 bytes: the HPUB line holds the subject, the
# reply subject (~50 bytes here) and three numbers. A longer line resets the whole connection.
_MAX_SUBJECT_BYTES = 3840
_HEADER_ALLOWANCE = 256  # a header block's fixed text and numbers, beyond ids, topic and reason
# The streams' max_msg_size, read at start and by every probe, but a busy sink is never probed:
# publishing reads them again in the background at least this often (seconds), so a lowered
# limit is known before an event over it fails its batch.
_LIMITS_REFRESH = 30.0
# An event `refusal` refused for its stream's limit is dead-lettered only after the limit was
# read again, unless it was read less than this long ago (seconds): a raised limit is seen at
# once, and a device sending oversized events costs a round trip a second at most.
_RECHECK_AFTER = 1.0


def event_subject(prefix: str, topic: str) -> str:
    """``<prefix>.<topic>`` with ``/`` as ``.`` (topics are already checked to be subject-safe)."""
    return f"{prefix}.{topic.replace('/', '.')}"


def _subject_token(value: str) -> str:
    """`value` as one subject token: ``.``, ``*``, ``>``, ``%``, whitespace and controls as %XX."""
    if not value:
        return "%"
    return "".join(f"%{ord(c):02X}" if c in _UNSAFE_TOKEN_CHARS else c for c in value)


def _header_value(value: str) -> str:
    """`value` as nats-py writes a header value: CR and LF as spaces, white space stripped."""
    if value.isprintable() and value[:1] != " " and value[-1:] != " ":
        # The common case, cheaply: the only printable white space is the ASCII space.
        return value
    return value.translate(_NEWLINES_AS_SPACES).strip()


async def _connect(url: str, seconds: float) -> tuple[AckClient, BatchPublisher]:
    """A connected client (which reconnects in the background from then on) and its batch
    publisher; `BackendError` if the server cannot be reached within ``seconds``."""
    client = AckClient()
    publisher = BatchPublisher(client)
    errors: list[Exception] = []
    shown = redacted_url(url)  # the logs get no password
    try:
        async with asyncio.timeout(seconds):
            await client.connect(
                url,
                name="cloud-sink",
                connect_timeout=max(1, round(seconds)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=_RECONNECT_WAIT,
                # A connection that died silently (NAT or conntrack expiry, a host gone, no
                # FIN or RST) looks connected until pings go unanswered: nats-py's default
                # (120 s x 2) kept the sink in an outage for ~6 minutes, past JetStream's
                # duplicate window for the resends. Pings every `seconds`: ~2-3 x that.
                ping_interval=max(1, round(seconds)),
                max_outstanding_pings=2,
                error_cb=_log_error(shown, errors),
                disconnected_cb=_on_lost(
                    publisher, logging.WARNING, "disconnected from NATS", shown
                ),
                reconnected_cb=_log_event(logging.WARNING, "reconnected to NATS", shown),
                closed_cb=_on_lost(publisher, logging.INFO, "NATS connection closed", shown),
            )
            await publisher.start()
    except _ERRORS as exc:
        await _close_quietly(client)
        cause = errors[-1] if errors else exc
        raise BackendError(f"cannot connect to NATS at {shown}: {cause!r}") from exc
    except BaseException:
        await _close_quietly(client)
        raise
    return client, publisher


class NatsCoreQueue:
    def __init__(
        self,
        client: NatsClient,
        publisher: BatchPublisher,
        *,
        stream: str,
        subject_prefix: str,
        dead_letter_stream: str,
        dead_letter_subject_prefix: str,
        timeout: float,
    ) -> None:
        self._client = client
        self._publisher = publisher
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.dead_letter_stream = dead_letter_stream
        self.dead_letter_subject_prefix = dead_letter_subject_prefix
        self.timeout = timeout
        self.url = ""  # set by `open`: a client nats-py closed for good is replaced (`probe`)
        self._closing = False
        self._duplicate_window = 120.0  # set by `open`, for `_ensure_streams`
        self._storage = StorageType.FILE
        self._removals_logged: set[str] = set()  # streams whose `removals` were logged
        # Each stream's own max_msg_size (headers count), if it has one, for `refusal`: read by
        # `_ensure_streams` at start and at every probe, by `publish` in the background every
        # `_LIMITS_REFRESH` seconds, and by `recheck_limits` after a refusal for it.
        self._max_msg_size: dict[str, int] = {}
        self._limits_read_at = time.monotonic()  # the last reading of both limits
        self._limits_due = self._limits_read_at + _LIMITS_REFRESH  # the next one in `publish`
        self._limits_refused = False  # `refusal` refused for a stream's max_msg_size since
        self._limits_task: asyncio.Task[None] | None = None
        self.duplicates = 0

    @classmethod
    async def open(
        cls,
        *,
        url: str,
        stream: str,
        subject_prefix: str,
        dead_letter_stream: str,
        dead_letter_subject_prefix: str,
        duplicate_window: float = 120.0,
        storage: Literal["file", "memory"] = "file",
        # The queue's setting for every later call too, not just a deadline for this one.
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> NatsCoreQueue:
        """Connect to `url` and create both streams or check the existing ones.

        Raises `BackendError` when the server cannot be reached within `timeout`, or when an
        existing stream does not take ``<prefix>.>``, keeps duplicates for less than
        `duplicate_window` seconds, keeps its messages in memory for a file queue, or cannot
        confirm (``no_ack``, ``sealed``). `ValueError` (nothing connected) for a subject prefix
        that is no subject's start, or two that overlap.
        """
        for key, prefix in (
            ("subject_prefix", subject_prefix),
            ("dead_letter_subject_prefix", dead_letter_subject_prefix),
        ):
            problem = subject_prefix_problem(prefix)
            if problem is not None:
                raise ValueError(f"{key} {prefix!r}: a NATS subject prefix {problem}")
        if subject_prefixes_overlap(subject_prefix, dead_letter_subject_prefix):
            raise ValueError(
                f"subject_prefix {subject_prefix!r} and dead_letter_subject_prefix"
                f" {dead_letter_subject_prefix!r} overlap"
            )
        client, publisher = await _connect(url, timeout)
        queue = cls(
            client,
            publisher,
            stream=stream,
            subject_prefix=subject_prefix,
            dead_letter_stream=dead_letter_stream,
            dead_letter_subject_prefix=dead_letter_subject_prefix,
            timeout=timeout,
        )
        queue.url = url
        queue._duplicate_window = duplicate_window
        queue._storage = StorageType.MEMORY if storage == "memory" else StorageType.FILE
        try:
            async with asyncio.timeout(timeout):
                await queue._ensure_streams()
        except BaseException as exc:
            await _close_quietly(client)
            if isinstance(exc, BackendError):
                raise
            if isinstance(exc, _ERRORS):
                raise BackendError(f"NATS stream setup on {redacted_url(url)}: {exc!r}") from exc
            raise
        return queue

    async def _ensure_streams(self, *, again: bool = False) -> None:
        """Both streams there (created if missing) and fit for use, as at start. ``again``: after
        the start, where a missing stream means lost events."""
        started = time.monotonic()
        for name, prefix in (
            (self.stream, self.subject_prefix),
            (self.dead_letter_stream, self.dead_letter_subject_prefix),
        ):
            limit = await self._ensure_stream(
                name, prefix, self._duplicate_window, self._storage, again
            )
            self._set_limit(name, limit)
        self._limits_read(started)

    def _set_limit(self, stream: str, limit: int | None) -> None:
        if limit is None:
            self._max_msg_size.pop(stream, None)
        else:
            self._max_msg_size[stream] = limit

    def _limits_read(self, started: float) -> None:
        """Both limits were read by a call that started at ``started`` (monotonic)."""
        self._limits_read_at = max(self._limits_read_at, started)
        self._limits_due = max(self._limits_due, started + _LIMITS_REFRESH)

    async def _read_limits(self) -> None:
        """Both streams' max_msg_size read again, nothing else checked (the probe does that);
        a stream not found keeps its limit: its publishes fail, and the probe creates it."""
        started = time.monotonic()
        jsm = self._client.jsm(timeout=self.timeout)
        for name in (self.stream, self.dead_letter_stream):
            try:
                size = (await jsm.stream_info(name)).config.max_msg_size
            except nats.js.errors.NotFoundError:
                continue
            self._set_limit(name, size if size is not None and size > 0 else None)
        self._limits_read(started)

    async def recheck_limits(self) -> bool:
        """Whether the streams' max_msg_size changed, read again if `refusal` refused for one
        since the last reading and that was `_RECHECK_AFTER` seconds ago or more: a refusal
        for a raised limit is never final (the forwarder asks again before dead-lettering). A
        failed reading keeps the limits (an outage shows in the publish, not here)."""
        if not self._limits_refused:
            return False
        self._limits_refused = False
        if time.monotonic() - self._limits_read_at < _RECHECK_AFTER:
            return False
        if not self._client.is_connected:
            return False
        before = dict(self._max_msg_size)
        try:
            async with asyncio.timeout(self.timeout):
                await self._read_limits()
        except _ERRORS as exc:
            log.warning("NATS: reading the streams' max_msg_size again: %r", exc)
            return False
        if self._max_msg_size == before:
            return False
        log.info("NATS: the streams' max_msg_size changed: %s", self._limits_text())
        return True

    def _limits_text(self) -> str:
        return ", ".join(
            f"{name} {self._max_msg_size.get(name, 'none')}"
            for name in (self.stream, self.dead_letter_stream)
        )

    def _refresh_limits_if_due(self) -> None:
        """Read the limits again in the background every `_LIMITS_REFRESH` seconds (no round
        trip in the publish itself): a busy sink is never probed."""
        now = time.monotonic()
        if now < self._limits_due or self._limits_task is not None or self._closing:
            return
        self._limits_due = now + _LIMITS_REFRESH  # the next attempt, even if this one fails
        self._limits_task = asyncio.create_task(self._refresh_limits())

    async def _refresh_limits(self) -> None:
        before = dict(self._max_msg_size)
        try:
            async with asyncio.timeout(self.timeout):
                await self._read_limits()
        except _ERRORS as exc:
            log.debug("NATS: refreshing the streams' max_msg_size: %r", exc)
        else:
            if self._max_msg_size != before:
                log.info("NATS: the streams' max_msg_size changed: %s", self._limits_text())
        finally:
            self._limits_task = None

    async def _ensure_stream(
        self,
        name: str,
        prefix: str,
        duplicate_window: float,
        storage: StorageType,
        again: bool = False,
    ) -> int | None:
        """The stream there and fit for use (`BackendError` if not); its ``max_msg_size`` if it
        has one (JetStream refuses a larger message, headers included, with an error PubAck)."""
        wanted = f"{prefix}.>"
        jsm = self._client.jsm(timeout=self.timeout)
        try:
            info = await jsm.stream_info(name)
        except nats.js.errors.NotFoundError:
            await jsm.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[wanted],
                    storage=storage,
                    duplicate_window=duplicate_window,
                )
            )
            if again:
                # Everything it held was confirmed to devices, which have deleted it (P1).
                log.error(
                    "JetStream stream %s was gone and is created again for %s: the events it held"
                    " are lost (the stream was deleted, or held in memory across a NATS restart)",
                    name,
                    wanted,
                )
            else:
                log.info("created JetStream stream %s for %s", name, wanted)
            return None
        config = info.config
        check_stream(name, config, wanted, duplicate_window, storage)
        found = removals(config)
        if found and name not in self._removals_logged:
            self._removals_logged.add(name)  # once, not at every probe
            log.warning(
                "JetStream stream %s removes messages whether a consumer read them or not: %s."
                " An event the sink confirmed (and its gateway deleted) can go before anything"
                " reads it; with discard new and no max_age a full stream refuses new events"
                " instead, and the gateways keep them",
                name,
                "; ".join(found),
            )
        size = config.max_msg_size
        return size if size is not None and size > 0 else None

    def refusal(self, message: CoreMessage | DeadLetterMessage) -> str | None:
        """A subject too long for the server's control line (it resets the connection on one),
        or a message with its headers over the server's ``max_payload`` (it refuses the
        publish) or over its stream's ``max_msg_size`` (JetStream refuses it: the whole batch
        failed, at every resend). A UTF-8 character is at most 4 bytes: what is clearly short
        is not encoded to measure."""
        if isinstance(message, DeadLetterMessage):
            stream = self.dead_letter_stream
            subject_bound = len(self.dead_letter_subject_prefix) + 4 * len(message.device_id)
            metadata = len(message.reason) + len(stream) + 2 * len(message.letter_id)
        else:
            stream = self.stream
            subject_bound = len(self.subject_prefix) + 4 * len(message.topic)
            metadata = 2 * len(message.event_id) + len(stream)
        if subject_bound + 1 > _MAX_SUBJECT_BYTES:
            subject = (
                self._dead_letter_subject(message)
                if isinstance(message, DeadLetterMessage)
                else event_subject(self.subject_prefix, message.topic)
            )
            if len(subject.encode()) > _MAX_SUBJECT_BYTES:
                return (
                    f"subject of {len(subject.encode())} bytes: NATS subjects here are limited"
                    f" to {_MAX_SUBJECT_BYTES} (the server's control line is 4 KiB)"
                )
        limit = max_payload = self._client.max_payload
        stream_limit = self._max_msg_size.get(stream)
        if stream_limit is not None and stream_limit < limit:
            limit = stream_limit
        metadata += len(message.topic) + len(message.device_id)
        if len(message.payload) + _HEADER_ALLOWANCE + 4 * metadata > limit:
            headers = (
                _dead_letter_headers(message, stream)
                if isinstance(message, DeadLetterMessage)
                else _event_headers(message, stream)
            )
            size = len(headers.encode()) + len(message.payload)
            if size > limit:
                if limit == max_payload:
                    return f"{size} bytes with its headers: the NATS server takes {max_payload}"
                self._limits_refused = True  # read again before it is final: `recheck_limits`
                return (
                    f"{size} bytes with its headers: JetStream stream {stream!r} takes {limit}"
                    " (its max_msg_size)"
                )
        return None

    def _dead_letter_subject(self, m: DeadLetterMessage) -> str:
        return f"{self.dead_letter_subject_prefix}.{_subject_token(m.device_id)}"

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        """Publish the whole batch at once; return when every PubAck is in, else `BackendError`."""
        if not messages:
            return PublishOutcome(stored=0, duplicates=0)
        self._refresh_limits_if_due()
        stream = self.stream
        items = [
            (event_subject(self.subject_prefix, m.topic), _event_headers(m, stream), m.payload)
            for m in messages
        ]
        duplicates = await self._publish_all(items, what="events")
        outcome = PublishOutcome(stored=len(messages) - duplicates, duplicates=duplicates)
        self.duplicates += duplicates
        return outcome

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        """Store undeliverable events in the dead-letter stream; `BackendError` if not confirmed."""
        if not messages:
            return
        stream = self.dead_letter_stream
        items = [
            (self._dead_letter_subject(m), _dead_letter_headers(m, stream), m.payload)
            for m in messages
        ]
        await self._publish_all(items, what="dead letters")

    async def _publish_all(self, items: Sequence[tuple[str, str, bytes]], *, what: str) -> int:
        """Publish ``(subject, header block, body)`` in order, then wait for every PubAck; the
        number of duplicates."""
        if not self._client.is_connected:
            raise BackendError(f"NATS is not connected: {len(items)} {what} not published")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._publisher.publish(items)
        except _PUBLISH_ERRORS as exc:
            if isinstance(exc, TimeoutError):
                detail = f"no PubAck for every message within {self.timeout:g}s"
                self._abort_if_stalled()
            else:
                detail = str(exc) if isinstance(exc, PublishRefused) else repr(exc)
            raise BackendError(f"NATS publish of {len(items)} {what}: {detail}") from exc

    def _abort_if_stalled(self) -> None:
        """After a publish timeout with bytes still unsent, the link is stalled (a cut without
        FIN or RST). nats-py's reconnect would first wait for them to drain: until the kernel
        gives up on the socket (about 15 minutes, past the duplicate window). Aborted, the
        connection is lost at once: the batches in flight fail, and nats-py reconnects as soon
        as the server can be reached."""
        try:
            writer: Any = getattr(self._client._transport, "_io_writer", None)  # nats-py's
            transport = writer.transport
            unsent = transport.get_write_buffer_size()
        except AttributeError:
            return
        if unsent:
            log.warning(
                "NATS: %d bytes still unsent after %gs without every PubAck: closing the stalled"
                " connection (nats-py connects again)",
                unsent, self.timeout,
            )  # fmt: skip
            transport.abort()

    async def probe(self) -> None:
        """Both streams checked (and created again if they were deleted: a probe that only
        looked at one passed while every publish failed) within ``timeout``; fails at once
        while nats-py is still reconnecting in the background."""
        if self._client.is_closed and self.url and not self._closing:
            # nats-py closes the client for good on some server errors on a live connection
            # (an authorization violation after a reload of the server's users, an expired
            # user): it never reconnects, and the sink stayed down until a restart.
            self._client, self._publisher = await _connect(self.url, self.timeout)
            log.warning("NATS: the connection had been closed for good; connected again")
        elif not self._client.is_connected:
            raise BackendError("NATS is not connected (reconnecting in the background)")
        try:
            async with asyncio.timeout(self.timeout):
                await self._ensure_streams(again=True)
        except BackendError:
            raise
        except _ERRORS as exc:
            raise BackendError(f"NATS probe of the streams: {exc!r}") from exc

    async def aclose(self) -> None:
        self._closing = True
        if self._limits_task is not None:
            self._limits_task.cancel()
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.close()
        except _ERRORS as exc:
            log.warning("closing the NATS connection: %r", exc)


# Every message names the stream it is for (``Nats-Expected-Stream``): if another stream took
# its subjects (ours deleted, another created over ``<prefix>.>``), the server refuses it with
# an error PubAck instead of storing it elsewhere (maybe in memory, with another duplicate
# window) and confirming, which passed for delivered.


def _dead_letter_headers(m: DeadLetterMessage, stream: str) -> str:
    letter_id = _header_value(m.letter_id)
    return (
        f"NATS/1.0\r\nNats-Msg-Id: {letter_id}\r\nNats-Expected-Stream: {stream}\r\n"
        f"letter-id: {letter_id}\r\n"
        f"reason: {_header_value(m.reason)}\r\n"
        f"device-id: {_header_value(m.device_id)}\r\n"
        f"topic: {_header_value(m.topic)}\r\n"
        f"received-at: {m.received_at_ms}\r\n\r\n"
    )


def _event_headers(m: CoreMessage, stream: str) -> str:
    """The SPEC §3 metadata as a NATS header block, ``Nats-Msg-Id`` (the event id) first."""
    event_id = _header_value(m.event_id)
    optional = "" if m.seq is None else f"seq: {m.seq}\r\n"
    if m.event_time_ms is not None:
        optional += f"event-time: {m.event_time_ms}\r\n"
    return (
        f"NATS/1.0\r\nNats-Msg-Id: {event_id}\r\nNats-Expected-Stream: {stream}\r\n"
        f"event-id: {event_id}\r\n"
        f"device-id: {_header_value(m.device_id)}\r\ntopic: {_header_value(m.topic)}\r\n"
        f"{optional}received-at: {m.received_at_ms}\r\nqos: {m.qos}\r\n\r\n"
    )


async def _close_quietly(client: NatsClient) -> None:
    try:
        async with asyncio.timeout(5.0):
            await client.close()
    except _ERRORS as exc:
        log.debug("closing a failed NATS connection: %r", exc)


def _log_error(url: str, errors: list[Exception]) -> Callable[[Exception], Awaitable[None]]:
    async def on_error(exc: Exception) -> None:
        errors[:] = [exc]  # the latest, for the message when the first connect fails
        log.warning("NATS %s: %r", url, exc)

    return on_error


def _on_lost(
    publisher: BatchPublisher, level: int, message: str, url: str
) -> Callable[[], Awaitable[None]]:
    """Log, and fail the batches waiting for PubAcks: they will not come on this connection."""

    async def on_lost() -> None:
        waiting = publisher.in_flight
        publisher.fail_all(f"{message} {url} while waiting for PubAcks")
        if waiting:
            log.log(level, "%s %s: %d batches waiting for PubAcks failed", message, url, waiting)
        else:
            log.log(level, "%s %s", message, url)

    return on_lost


def _log_event(level: int, message: str, url: str) -> Callable[[], Awaitable[None]]:
    async def on_event() -> None:
        log.log(level, "%s %s", message, url)

    return on_event
