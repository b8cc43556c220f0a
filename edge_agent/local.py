"""The local MQTT listener: the ingest server with the buffer as its durable stage.

A local publisher's PUBACK (QoS 1) or PUBREC (QoS 2) leaves only once its event is committed. An
invalid event or one the buffer refuses (``on_full = "reject"``) gets no ack and the connection is
closed: MQTT 3.1.1 has no negative acknowledgement, and the publisher keeps the event to resend.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from edge_agent.accept import Acceptor, InvalidEvent
from edge_agent.buffer import BufferFull, NewEvent
from edge_agent.config import ListenerConfig, ListenerTls
from edge_agent.tls import key_matches
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
    "ListenerTlsError",
    "build_listener",
    "listener_tls",
    "openssl_reads_certificates",
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


class ListenerTlsError(Exception):
    """``[listener.tls]`` files that cannot be used: one line naming the section and the files."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"[listener.tls]: {problem}")


def listener_tls(tls: ListenerTls) -> tuple[ssl.SSLContext, x509.Certificate]:
    """The listener's server context (clients must present a certificate issued by ``tls.ca``)
    and its certificate.

    Raises `ListenerTlsError` naming every file that cannot be read, else the one whose content
    cannot be used: OpenSSL's own errors name no file ("No such file or directory", "PEM lib"),
    and it would ask a terminal for the pass phrase of an encrypted key.
    """
    named = (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key))
    data: dict[str, bytes] = {}
    unreadable = []
    for what, path in named:
        try:
            data[what] = path.read_bytes()
        except IsADirectoryError:
            unreadable.append(f"{what} {path} is a directory, not a file")
        except OSError as exc:
            unreadable.append(f"cannot read {what} {path}: {exc.strerror or exc}")
    if unreadable:
        raise ListenerTlsError("; ".join(unreadable))
    try:
        x509.load_pem_x509_certificates(data["ca"])
    except ValueError:
        # OpenSSL reads forms cryptography does not (TRUSTED CERTIFICATE): it judges those.
        if not openssl_reads_certificates(tls.ca):
            raise ListenerTlsError(
                f"ca {tls.ca} has no usable CA certificate (PEM) for the clients' certificates"
            ) from None
    try:
        certificate = x509.load_pem_x509_certificates(data["cert"])[0]  # then its chain, if any
    except ValueError:
        raise ListenerTlsError(f"cert {tls.cert} is not a PEM certificate") from None
    try:
        key = load_pem_private_key(data["key"], password=None)
    except TypeError:
        raise ListenerTlsError(
            f"key {tls.key} is encrypted: the agent needs it without a pass phrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ListenerTlsError(f"key {tls.key} is not a PEM private key") from None
    if not key_matches(key, certificate):
        raise ListenerTlsError(f"key {tls.key} is not the key of cert {tls.cert}")
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as exc:  # changed since it was read, or OpenSSL's own limits
        raise ListenerTlsError(f"ca {tls.ca}: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ListenerTlsError(f"cert {tls.cert} / key {tls.key}: {exc}") from None
    return context, certificate


def openssl_reads_certificates(path: Path) -> bool:
    """Whether OpenSSL loads a certificate from ``path`` (it reads forms ``cryptography`` does
    not: ``TRUSTED CERTIFICATE``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError):
        return False
    return context.cert_store_stats()["x509"] > 0


def build_listener(
    config: ListenerConfig, acceptor: Acceptor, ssl_context: ssl.SSLContext | None = None
) -> IngestServer:
    """The listener; with ``[listener.tls]``, ``ssl_context`` is `listener_tls`'s (loaded here
    if not given, raising `ListenerTlsError`)."""
    authenticator: Authenticator = Anonymous()
    if config.tls is None:
        ssl_context = None
    else:
        if ssl_context is None:
            ssl_context, _ = listener_tls(config.tls)
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
        # Debug: local devices that connect for each reading (scripts, battery sensors) made two
        # lines per event, and a publisher refused by a full buffer two per retry (SPEC §5: never
        # a line per event). The listener's metrics count connections by how they end.
        connection_log=logging.DEBUG,
    )
