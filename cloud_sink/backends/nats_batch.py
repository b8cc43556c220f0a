"""JetStream publishing of a whole batch over nats-py's connection: one write, one wait.

nats-py's ``publish_async`` costs about 25 µs of CPU per message (a semaphore wait, a NUID and a
random token, a future with a done callback, a `PubAck` dataclass, the header dict encoded, a
`Msg`, a queue item and a task switch per PubAck); with it, publishing was most of the sink's
CPU per event (docs/benchmarks.md, "Sink"). `BatchPublisher` keeps nats-py's connection, its
pending buffer and flusher (so reconnect handling, ordering and flushing stay nats-py's) and
does the per-message work itself, once per batch:

- the HPUB frames of the batch, each with its header block, are built here and handed to
  nats-py's pending buffer as one command, in order;
- message ``i`` of batch ``n`` asks for its PubAck on ``<inbox>.<n>.<i>``: one wildcard
  subscription takes the PubAcks of every batch, and `AckClient` hands them to the publisher
  straight from nats-py's protocol parser (no `Msg`, no queue, no task switch per PubAck);
- a PubAck is read without JSON unless it holds an error, a duplicate flag or anything
  unexpected; the batch waits on one future, completed by its last PubAck or first refusal.

Batch numbers are never reused, and a batch's tracker is removed when it completes, fails, times
out or is cancelled: a late PubAck of a batch that gave up finds no tracker and is ignored, never
counted for a later batch. A disconnect fails every batch in flight at once (`fail_all`): what
was sent may or may not be stored, and the resend is recognised by its ``Nats-Msg-Id``.

Uses nats-py internals (``Client._process_msg``, ``_pending``, ``_pending_data_size``,
``_flush_pending``, ``_flush_queue``, ``Subscription._id``): pyproject.toml pins nats-py to the
tested release.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient

__all__ = ["AckClient", "BatchPublisher", "PublishRefused"]

_CRLF = b"\r\n"
# The start of every PubAck nats-server writes (``{"stream":"S","seq":N}``, with
# ``"duplicate":true`` for a resend and ``"domain"`` in a domain); anything else, or one that
# mentions an error or a duplicate, is read as JSON.
_PUBACK_START = b'{"stream":'
# nats-py's own publish check: a subject with white space or CR/LF would split the protocol line.
_BAD_SUBJECT = re.compile(r"[ \t\r\n]")

AckHandler = Callable[[bytes, bytes, "bytes | None"], None]


class PublishRefused(Exception):
    """The batch was not confirmed: a PubAck with an error, no responder (no stream for the
    subject), a message the server would refuse, or the connection lost while waiting."""


class AckClient(NatsClient):
    """nats-py's client, except that messages of one subscription (the PubAck inbox) go to a
    plain function from the protocol parser instead of through a `Msg` and a queue."""

    def __init__(self) -> None:
        super().__init__()
        self._ack_sid = -1
        self._ack_handler: AckHandler | None = None

    def route_acks(self, sid: int, handler: AckHandler) -> None:
        self._ack_sid = sid
        self._ack_handler = handler

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._ack_handler
        if sid == self._ack_sid and handler is not None:
            stats = self.stats
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            # headers is None for a message without (nats-py's annotation says bytes).
            handler(subject, data, headers)
            return
        await super()._process_msg(sid, subject, reply, data, headers)


@dataclass(slots=True, eq=False)
class _Batch:
    done: asyncio.Future[None]
    seen: bytearray  # one byte per message: its PubAck is in
    pending: int
    duplicates: int = 0
    error: str | None = None


class BatchPublisher:
    """Publishes batches on an `AckClient` and waits for their PubAcks (see the module doc)."""

    def __init__(self, client: AckClient) -> None:
        self._client = client
        self._inbox = ""
        self._batches: dict[bytes, _Batch] = {}
        self._number = 0

    async def start(self) -> None:
        """Subscribe to the PubAck inbox (nats-py subscribes again after every reconnect)."""
        inbox = self._client.new_inbox()
        subscription = await self._client.subscribe(f"{inbox}.*.*")
        self._inbox = inbox
        self._client.route_acks(subscription._id, self._on_reply)

    @property
    def in_flight(self) -> int:
        """Batches waiting for PubAcks."""
        return len(self._batches)

    async def publish(self, items: Sequence[tuple[str, str, bytes]]) -> int:
        """Publish ``(subject, header block, body)`` messages in this order; return the number
        of duplicates once every PubAck is in.

        The header block is the whole ``NATS/1.0\\r\\n...\\r\\n\\r\\n`` text, its values already
        safe. Raises `PublishRefused` (nothing is sent when a subject is malformed or a message
        is larger than the server's ``max_payload``); the caller bounds the wait (a cancelled
        or timed-out batch forgets its PubAcks).
        """
        if not self._inbox:
            raise PublishRefused("the PubAck inbox is not subscribed (start() first)")
        if not items:
            return 0
        client = self._client
        max_payload = client.max_payload
        self._number += 1
        reply = f"{self._inbox}.{self._number}."
        frames: list[bytes] = []
        checked: set[str] = set()
        body_bytes = 0
        for index, (subject, headers, body) in enumerate(items):
            if subject not in checked:
                if not subject or _BAD_SUBJECT.search(subject):
                    raise PublishRefused(f"message {index}: malformed subject {subject!r}")
                checked.add(subject)
            head = headers.encode()
            size = len(head) + len(body)
            if size > max_payload:
                # The server would close the connection on it (nats-py checks only the body).
                raise PublishRefused(
                    f"message {index} on {subject} is {size} bytes with its headers,"
                    f" more than the server's max_payload {max_payload}"
                )
            frames.append(f"HPUB {subject} {reply}{index} {len(head)} {size}\r\n".encode() + head)
            frames.append(body)
            frames.append(_CRLF)
            body_bytes += len(body)
        key = reply[:-1].encode()
        batch = _Batch(
            asyncio.get_running_loop().create_future(), bytearray(len(items)), len(items)
        )
        self._batches[key] = batch
        client.stats["out_msgs"] += len(items)  # as nats-py's publish counts (body bytes only)
        client.stats["out_bytes"] += body_bytes
        try:
            # One command: nothing of another batch can come in between, and nats-py writes
            # its pending buffer in order. Appended here, not with `_send_command`: past
            # nats-py's pending limit (2 MiB, a stage call often is more) that one forces a
            # flush and waits for the socket to drain, swallowing a cancellation, so neither
            # our timeout nor the caller's could end the wait on a stalled link. Our wait is
            # `batch.done`, which they can.
            command = b"".join(frames)
            client._pending.append(command)
            client._pending_data_size += len(command)
            if client._flush_queue is not None and client._flush_queue.empty():
                await client._flush_pending()  # kick the flusher, as nats-py's publish does
            await batch.done
        finally:
            self._batches.pop(key, None)
        if batch.error is not None:
            raise PublishRefused(batch.error)
        return batch.duplicates

    def fail_all(self, reason: str) -> None:
        """Fail every batch in flight (the connection is gone: their PubAcks will not come)."""
        batches = list(self._batches.values())
        self._batches.clear()
        for batch in batches:
            if batch.error is None:
                batch.error = reason
            if not batch.done.done():
                batch.done.set_result(None)

    def _on_reply(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        # Called by nats-py's parser for every PubAck: must not raise, must stay cheap.
        key, _, index_text = subject.rpartition(b".")
        batch = self._batches.get(key)
        if batch is None:
            return  # a batch that completed, failed, timed out or was cancelled
        try:
            index = int(index_text)
        except ValueError:
            return
        seen = batch.seen
        if not 0 <= index < len(seen) or seen[index]:
            return  # not a reply we asked for
        seen[index] = 1
        if (
            headers is not None
            or not data.startswith(_PUBACK_START)
            or b'"error"' in data
            or b'"duplicate"' in data
        ):
            refusal, duplicate = read_reply(data, headers)
            if refusal is not None:
                batch.error = f"message {index} refused: {refusal}"
                self._finish(key, batch)
                return
            batch.duplicates += duplicate
        batch.pending -= 1
        if not batch.pending:
            self._finish(key, batch)

    def _finish(self, key: bytes, batch: _Batch) -> None:
        self._batches.pop(key, None)
        if not batch.done.done():
            batch.done.set_result(None)


def read_reply(data: bytes, headers: bytes | None) -> tuple[str | None, bool]:
    """A JetStream publish reply as (refusal or None, duplicate)."""
    if headers is not None and not data:
        # A status without body: 503 is "no responders", no stream takes the subject.
        status = headers.split(_CRLF, 1)[0].decode("utf-8", "replace")
        if status.startswith("NATS/1.0 503"):
            return "no responders (no stream takes the subject)", False
        return f"status {status!r}", False
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):  # runs in nats-py's parser: must not raise
        return f"not a PubAck: {data[:200]!r}", False
    if not isinstance(reply, dict):
        return f"not a PubAck: {data[:200]!r}", False
    error = reply.get("error")
    if error is not None:
        if isinstance(error, dict):
            description = error.get("description", "")
            return f"{description} (code {error.get('code')}, {error.get('err_code')})", False
        return repr(error), False
    if "stream" not in reply or "seq" not in reply:
        return f"not a PubAck: {data[:200]!r}", False
    return None, reply.get("duplicate") is True
