"""The local MQTT listener: the ingest server with the buffer as its durable stage.

A local publisher's PUBACK (QoS 1) or PUBREC (QoS 2) leaves only once its event is committed. An
invalid event or one the buffer refuses (``on_full = "reject"``) gets no ack and the connection is
closed: MQTT 3.1.1 has no negative acknowledgement, and the publisher keeps the event to resend.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import NameOID

from edge_agent.accept import Acceptor, InvalidEvent
from edge_agent.buffer import BufferFull, NewEvent
from edge_agent.config import ListenerConfig
from mqtt_ingest import (
    Anonymous,
    Authenticator,
    ConnackCode,
    ConnectRequest,
    Identity,
    IngestEvent,
    IngestServer,
    Limits,
    Refusal,
    StageRefused,
)

__all__ = [
    "LISTENER_FILE",
    "BufferStage",
    "CertificateCommonName",
    "ListenerRecord",
    "build_listener",
    "read_listener_file",
    "remove_listener_file",
    "write_listener_file",
]

LISTENER_FILE = "listener.json"
"""In the data directory: where the running agent's listener is (``edge-agent publish`` checks
it belongs to the process holding the buffer's lock before it trusts a PUBACK from that port)."""


def write_listener_file(directory: Path, host: str, port: int, tls: bool) -> None:
    """Record this process's listener (replaced atomically; a stale one names another pid)."""
    path = directory / LISTENER_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), "host": host, "port": port, "tls": tls}))
    os.replace(temporary, path)


def remove_listener_file(directory: Path) -> None:
    """At close: a stale file could name a reused pid (PID 1 in every container)."""
    (directory / LISTENER_FILE).unlink(missing_ok=True)


class ListenerRecord(NamedTuple):
    pid: int
    host: str
    port: int
    tls: bool


def read_listener_file(directory: Path) -> ListenerRecord | None:
    """What `write_listener_file` recorded, or None if nothing usable is there."""
    try:
        found = json.loads((directory / LISTENER_FILE).read_text())
        record = ListenerRecord(found["pid"], found["host"], found["port"], found["tls"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    types = (int, str, int, bool)
    return record if all(map(isinstance, record, types)) else None


class BufferStage:
    """`DurableStage` that commits events into the agent's buffer."""

    def __init__(self, acceptor: Acceptor) -> None:
        self._acceptor = acceptor

    async def store(self, events: Sequence[IngestEvent]) -> Sequence[StageRefused | None] | None:
        outcomes: list[StageRefused | None] = [None] * len(events)
        valid: list[tuple[int, NewEvent]] = []
        for index, event in enumerate(events):
            try:
                valid.append(
                    (index, self._acceptor.prepare(event.topic, event.payload, event.received_at))
                )
            except InvalidEvent as exc:
                outcomes[index] = StageRefused(exc.reason)
        results = await self._acceptor.accept_many([new for _, new in valid]) if valid else []
        for (index, _), result in zip(valid, results, strict=True):
            if isinstance(result, BufferFull):
                outcomes[index] = StageRefused(result.reason)
        return outcomes if any(outcomes) else None


class CertificateCommonName:
    """Identity from the TLS-verified client certificate's CN (listener with ``[listener.tls]``)."""

    async def authenticate(self, request: ConnectRequest) -> Identity | Refusal:
        if request.peer_certificate is None:
            return Refusal("no client certificate", ConnackCode.NOT_AUTHORIZED)
        certificate = x509.load_der_x509_certificate(request.peer_certificate)
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            return Refusal("client certificate without a CN", ConnackCode.NOT_AUTHORIZED)
        return Identity(str(names[0].value))


def build_listener(config: ListenerConfig, acceptor: Acceptor) -> IngestServer:
    ssl_context: ssl.SSLContext | None = None
    authenticator: Authenticator = Anonymous()
    if config.tls is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(config.tls.ca))
        ssl_context.verify_mode = ssl.CERT_REQUIRED
        ssl_context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
        authenticator = CertificateCommonName()
    limits = Limits(
        connect_timeout=config.connect_timeout,
        max_packet_size=config.max_packet_size,
        max_connections=config.max_connections,
        max_inflight=config.max_inflight,
        # The buffer's group commit lingers for more events already; a second linger in front of
        # it, or a batch waiting for the previous one's commit, would only add to every publish.
        batch_linger=0.0,
        stage_concurrency=8,
    )
    return IngestServer(
        stage=BufferStage(acceptor),
        authenticator=authenticator,
        host=config.host,
        port=config.port,
        ssl_context=ssl_context,
        limits=limits,
        clock=acceptor.clock,
        name="edge-agent.listener",
    )
