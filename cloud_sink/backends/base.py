"""The `CoreQueue` seam every backend implements (STYLE 2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "BackendError",
    "CoreMessage",
    "CoreQueue",
    "DeadLetterMessage",
    "PublishOutcome",
    "redacted_url",
    "subject_prefix_problem",
    "subject_prefixes_overlap",
]


def redacted_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: what logs and `check-config` show. The
    password; or, without one, the user part (``nats://TOKEN@host`` is a NATS token)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url  # not a URL the config accepts (it is checked): nothing to find in it
    if "@" not in parts.netloc:
        return url
    user, _, host = parts.netloc.rpartition("@")
    shown = f"{user.partition(':')[0]}:***" if ":" in user else "***"
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def subject_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot start NATS subjects (``<prefix>.<topic>``, a stream for
    ``<prefix>.>``), or None. Here, not in the NATS backend, for the configuration to check."""
    if not prefix:
        return "must not be empty"
    if any(c.isspace() or not c.isprintable() for c in prefix):
        return "must hold no white space or control characters"
    if "*" in prefix or ">" in prefix:
        # Every event's subject would be a wildcard: stored on a literal '*' subject, or refused.
        return "must hold no wildcard ('*' or '>')"
    if "" in prefix.split("."):
        return "must not start or end with '.' nor hold '..' (an empty token)"
    return None


def subject_prefixes_overlap(first: str, second: str) -> bool:
    """Whether subjects under one prefix may be subjects under the other too (the same, or one
    the first tokens of the other): the two streams' subjects would overlap."""
    a, b = first.split("."), second.split(".")
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


class BackendError(Exception):
    """The backend did not confirm: nothing of the batch may be acknowledged (retry later)."""


class CoreMessage(NamedTuple):
    """One event as the core queue receives it (SPEC §3): body unchanged, metadata beside it.

    A named tuple, not a frozen dataclass: the sink makes one per event on its event loop, and a
    tuple is built in C (a frozen dataclass sets each field through ``object.__setattr__``); the
    sqlite backend binds the fields in this order as they are."""

    event_id: str  # device_id/epoch/seq, or a sink-generated id for raw publishes
    device_id: str
    topic: str  # the uplink topic
    payload: bytes
    qos: int
    received_at_ms: int  # sink clock
    seq: int | None = None  # None for raw publishes
    event_time_ms: int | None = None  # device clock; None for raw publishes


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    """An acknowledged event that cannot be delivered as such (malformed envelope, unmappable
    topic): stored with its reason instead of dropped."""

    device_id: str
    topic: str
    payload: bytes
    reason: str
    received_at_ms: int
    letter_id: str
    """The same for the device's resend of the same event, so the backend stores it once (as
    for events): the event id, or for an envelope that cannot be decoded a digest of its topic
    and bytes; for a raw publish a new id (nothing tells its resend from a second event)."""


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    stored: int
    duplicates: int  # already delivered before (same event id): not stored twice


class CoreQueue(Protocol):
    def refusal(self, message: CoreMessage | DeadLetterMessage) -> str | None:
        """Why this backend can never store ``message``, whatever its state (larger than it
        takes, a topic it cannot carry as a name), or None. The forwarder asks before it
        publishes, for every message, so this must be cheap: a message let through that the
        backend then rejects fails its whole batch, as an outage does, and comes back with the
        device's resend."""
        ...

    async def recheck_limits(self) -> bool:
        """Whether the limits `refusal` judges by changed, read again if they can change
        while the sink runs and `refusal` refused for one since they were read (else False at
        once, without a round trip). The forwarder asks before it dead-letters, and asks
        `refusal` again on True: a limit raised behind a busy sink dead-lettered events it
        takes. Never raises for a failed reading (the publish shows an outage)."""
        ...

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        """Return once every message is confirmed by the backend; raise `BackendError` if not."""
        ...

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        """Store undeliverable events with their reason; raise `BackendError` if not confirmed."""
        ...

    async def probe(self) -> None:
        """One round trip that shows the backend can confirm again (reconnecting if needed);
        raise `BackendError` if not. Bounded by the backend's own timeout."""
        ...

    async def aclose(self) -> None: ...
