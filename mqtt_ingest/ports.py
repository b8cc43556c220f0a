"""The plug points of the ingest server (STYLE 2): what the agent and the sink provide.

- `Authenticator`: CONNECT fields and the verified peer certificate -> an `Identity` or a `Refusal`.
- `TopicRights`: may this identity publish to / subscribe to this topic?
- `DurableStage`: takes batches of events and returns once they are durable (the agent's SQLite
  buffer, the sink's core queue). Only then does the server acknowledge them.
- `Availability`: whether the durable stage can take events now; while it cannot, the server
  reads from no connection and refuses new CONNECTs with "server unavailable".
- `Metrics`: counters.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mqtt_ingest.codec import ConnackCode

__all__ = [
    "MAX_PEER_CHAIN",
    "Action",
    "AllowAll",
    "Anonymous",
    "Authenticator",
    "Availability",
    "ConnectRequest",
    "DurableStage",
    "Identity",
    "IngestEvent",
    "Metrics",
    "Refusal",
    "StageRefused",
    "TopicRights",
]


MAX_PEER_CHAIN = 8
"""The most intermediates a `ConnectRequest` (kept for the connection's life) holds: a chain
verified with more is kept cut short (it will not verify again from what was kept)."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What an authenticator gets to decide on."""

    client_id: str
    username: str | None
    password: bytes | None
    clean_session: bool
    keep_alive: int
    peer_certificate: bytes | None  # DER, present only when TLS verified it
    peer_address: str
    peer_chain: tuple[bytes, ...] = ()
    """The intermediate certificates (DER, leaf first) TLS verified the peer certificate with:
    its verified chain without the leaf and the trust anchor, at most `MAX_PEER_CHAIN`."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on a connection, as the authenticator decided.

    ``attributes`` carries whatever the stage needs to know about the connection (for instance
    the envelope format announced at CONNECT); ``expires_at`` (wall-clock seconds, e.g. a JWT's
    ``exp`` plus leeway) closes the connection at that time.
    """

    name: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused CONNECT: ``reason`` goes to the log, ``code`` into the CONNACK, ``label`` (a
    short fixed text; ``reason`` when not given) into the metrics. A reason that quotes what the
    client sent needs a label, or hostile clients could grow the metrics without bound."""

    reason: str
    code: ConnackCode = ConnackCode.NOT_AUTHORIZED
    label: str | None = None


class Authenticator(Protocol):
    async def authenticate(self, request: ConnectRequest) -> Identity | Refusal: ...


class Action(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


class TopicRights(Protocol):
    def allowed(self, identity: Identity, topic: str, action: Action) -> bool:
        """Called on the hot path for every PUBLISH: keep it cheap and free of I/O."""
        ...


@dataclass(frozen=True, slots=True)
class IngestEvent:
    """One accepted PUBLISH, as the durable stage receives it."""

    identity: Identity
    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float  # wall clock, seconds since the epoch


class StageRefused(Exception):
    """A durable stage refusing one event (for instance a full buffer); that event is not acked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DurableStage(Protocol):
    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        """Make ``events`` durable; return only once they are.

        Return None when every event is stored, or one entry per event: None for stored, a
        `StageRefused` for an event that was not (it gets no ack and its connection is closed).
        Raising fails the whole batch the same way. The server applies a timeout.
        """
        ...


class Availability(Protocol):
    """A gate in front of the durable stage (for instance: is the core queue reachable?).

    While ``available`` is false the server stops reading every connection (in-flight events
    still complete or fail) and answers a new CONNECT with CONNACK 3, "server unavailable". The
    owner of the gate logs its transitions; the server does not log each refusal.
    """

    @property
    def available(self) -> bool:
        """Called before every packet read: keep it cheap and free of I/O."""
        ...

    async def wait_available(self) -> None:
        """Return once ``available`` is true (at once if it is)."""
        ...


class Metrics(Protocol):
    def inc(self, name: str, amount: int = 1, reason: str = "") -> None:
        """Add ``amount`` to counter ``name`` (with an optional ``reason`` label)."""
        ...


class AllowAll:
    """Topic rights that allow every publish and refuse every subscription (no fan-out here)."""

    def allowed(self, identity: Identity, topic: str, action: Action) -> bool:
        return action is Action.PUBLISH


class Anonymous:
    """Accept every CONNECT; the identity is the client id. Only for a loopback listener."""

    async def authenticate(self, request: ConnectRequest) -> Identity | Refusal:
        return Identity(request.client_id)
