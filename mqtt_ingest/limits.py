"""Resource limits of the ingest server, with defaults that keep a hostile peer cheap (F14-F16)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MQTT_MAX_PACKET", "Limits"]

MQTT_MAX_PACKET = 268_435_455
"""The largest remaining length MQTT 3.1.1's variable-length encoding can express (256 MB)."""


@dataclass(frozen=True, slots=True)
class Limits:
    connect_timeout: float = 5.0
    """Seconds from accept (TLS handshake included) to a complete CONNECT."""
    max_packet_size: int = 256 * 1024
    """Whole packet, checked on the fixed header before the body is read."""
    max_connections: int = 10_000
    """Beyond this, new sockets are closed at once."""
    max_inflight: int = 256
    """Events of one connection handed to the stage but not yet acknowledged; at the limit the
    server stops reading that socket (TCP backpressure)."""
    max_keep_alive: int = 3600
    """A client asking for more (or for 0, "never") is held to this one."""
    keep_alive_factor: float = 1.5
    max_client_id_bytes: int = 128
    batch_max_events: int = 512
    """The durable stage receives at most this many events per call ..."""
    batch_linger: float = 0.002
    """... gathered across all connections for at most this long after the first one."""
    max_unreleased: int = 4096
    """QoS 2 messages of one connection answered with PUBREC and awaiting PUBREL: beyond, the
    connection is closed (a client that never sends PUBREL held memory per packet id)."""
    stage_timeout: float = 30.0
    """A stage call that takes longer fails its events: no ack, connections closed."""
    stage_concurrency: int = 1
    """Stage calls in progress at once. Above 1 only for a stage that takes a call's events in
    call order before its first ``await`` and groups them itself (the agent's buffer): a batch
    then need not wait for the previous call to finish."""
    stop_deadline: float = 10.0
    """On stop, in-flight events get this long to be stored and acknowledged."""
    session_expiry: float = 3600.0
    """How long the QoS 2 state of a client with a persistent session (CleanSession 0) is kept
    after its connection closed: the packet ids it got PUBREC for and no PUBREL yet."""
    max_sessions: int = 10_000
    """At most this many such sessions are kept (the oldest closed ones go first)."""
    max_session_ids: int = 65_536
    """... and at most this many packet ids in all of them together (about 13 MB)."""

    def __post_init__(self) -> None:
        positive = {
            "connect_timeout": self.connect_timeout,
            "max_packet_size": self.max_packet_size,
            "max_connections": self.max_connections,
            "max_inflight": self.max_inflight,
            "max_unreleased": self.max_unreleased,
            "max_keep_alive": self.max_keep_alive,
            "max_client_id_bytes": self.max_client_id_bytes,
            "batch_max_events": self.batch_max_events,
            "stage_timeout": self.stage_timeout,
            "stage_concurrency": self.stage_concurrency,
            "session_expiry": self.session_expiry,
            "max_sessions": self.max_sessions,
            "max_session_ids": self.max_session_ids,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"limits.{name} must be positive, got {value}")
        if self.keep_alive_factor < 1:
            raise ValueError(f"limits.keep_alive_factor must be >= 1, got {self.keep_alive_factor}")
        if self.batch_linger < 0 or self.stop_deadline < 0:
            raise ValueError("limits.batch_linger and limits.stop_deadline cannot be negative")
        if self.max_packet_size > MQTT_MAX_PACKET:
            raise ValueError("limits.max_packet_size is over MQTT's 256 MB maximum")
