"""The start of a client connection (mqtt_ingest/connection.py): the TLS handshake, the CONNECT
and its authentication, all within the CONNECT deadline (`Limits.connect_timeout`).

`Handshake.run` returns the `Admission` a `Connection` then applies (registers the session, sends
CONNACK 0); a client refused gets its refusing CONNACK here, and the connection ends with `Close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from mqtt_ingest.codec import (
    CONNECT,
    ConnackCode,
    Connect,
    MalformedPacket,
    UnexpectedPacket,
    UnsupportedProtocol,
    encode_connack,
    read_packet,
)
from mqtt_ingest.ports import MAX_PEER_CHAIN, ConnectRequest, Identity, Refusal

if TYPE_CHECKING:
    from mqtt_ingest.server import IngestServer

__all__ = ["MAX_CONNECT_BYTES", "Admission", "Close", "Handshake"]

log = logging.getLogger(__name__)

MAX_CONNECT_BYTES = 16 * 1024
"""The largest CONNECT read: a client id, a device id and a JWT (wills are refused) fit well
within it, and a client not yet authenticated gets no more of our memory than that."""


class Close(Exception):
    """End this connection; ``reason`` goes to the log and ``label`` to the ``closed`` counter."""

    def __init__(self, reason: str, *, label: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.label = label or reason


@dataclass(frozen=True, slots=True)
class Admission:
    """A CONNECT the authenticator accepted."""

    identity: Identity
    request: ConnectRequest
    """What the client authenticated with (its certificate and token: kept to judge it again
    at a reload, `IngestServer.close_where`). Its client id is ``auto-...`` for an empty one
    with a clean session."""


class Handshake:
    """One connection's way from the accept to an `Admission`, within ``connect_by`` (the loop's
    time). ``stopping`` tells whether the server is stopping (`Connection.finish`)."""

    def __init__(
        self,
        server: IngestServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        connect_by: float,
        stopping: Callable[[], bool],
    ) -> None:
        self.server = server
        self.metrics = server.metrics
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.connect_by = connect_by
        self._stopping = stopping
        self._client_id = ""  # for the log lines of a refusal

    async def run(self) -> Admission:
        """Raises `Close` (after a refusing CONNACK where MQTT has one)."""
        if self.server.ssl_context is not None:
            await self._start_tls(self.server.ssl_context)
        packet = await self._read_connect()
        gate = self.server.availability
        if gate is not None and not gate.available:
            # The gate's owner logged the outage once; a line per refused device would flood.
            await self._refuse(
                ConnackCode.SERVER_UNAVAILABLE, "stage unavailable", "unavailable", quiet=True
            )
        client_id = await self._client_id_of(packet)
        if packet.will_topic is not None:
            # A will is a message for subscribers on an unclean disconnect; nothing here delivers
            # to subscribers, so accepting it would drop it silently.
            await self._refuse(
                ConnackCode.NOT_AUTHORIZED, "will messages are not supported", "will"
            )
        ssl_object = self.writer.get_extra_info("ssl_object")
        certificate = await self._peer_certificate(ssl_object)
        request = ConnectRequest(
            client_id=client_id,
            username=packet.username,
            password=packet.password,
            clean_session=packet.clean_session,
            keep_alive=packet.keep_alive,
            peer_certificate=certificate,
            peer_address=self.peer,
            peer_chain=_intermediates(ssl_object) if certificate is not None else (),
        )
        identity = await self._authenticate(request)
        if identity.expires_at is not None and identity.expires_at <= self.server.clock.time():
            await self._refuse(ConnackCode.NOT_AUTHORIZED, "credentials expired", "expired")
        return Admission(identity, request)

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        try:
            async with asyncio.timeout_at(self.connect_by):
                await self.writer.start_tls(context)
        except TimeoutError:
            self.metrics.inc("connections_refused", reason="connect_timeout")
            raise Close("no TLS handshake in time", label="connect_timeout") from None
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            # A wrong certificate, a port scan: counted, logged at debug (asyncio's own TLS
            # listener logged each as an ERROR with a traceback).
            self.metrics.inc("connections_refused", reason="tls_handshake")
            raise Close(f"TLS handshake failed: {exc!r}", label="tls_handshake") from None

    async def _read_connect(self) -> Connect:
        max_size = min(self.server.limits.max_packet_size, MAX_CONNECT_BYTES)
        try:
            async with asyncio.timeout_at(self.connect_by):
                # Nothing but a CONNECT, and a small one, is read from a client not yet
                # authenticated: it could otherwise make us hold max_packet_size per socket.
                packet = await read_packet(self.reader, max_size, only=CONNECT)
        except TimeoutError:
            self.metrics.inc("connections_refused", reason="connect_timeout")
            raise Close("no CONNECT in time", label="connect_timeout") from None
        except UnexpectedPacket as exc:
            self.metrics.inc("connections_refused", reason="not_connect")
            raise Close(f"first packet is {exc.name}, not CONNECT", label="malformed") from None
        except asyncio.IncompleteReadError:
            raise Close("closed before CONNECT", label="closed_before_connect") from None
        except UnsupportedProtocol as exc:
            if exc.name in ("MQTT", "MQIsdp"):  # MQTT 5, 3.1: told so (MQTT-3.1.2-2)
                code = ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION
                await self._refuse(code, exc.reason, "protocol")
            self.metrics.inc("connections_refused", reason="protocol")
            raise Close(exc.reason, label="protocol") from None  # not MQTT at all
        except MalformedPacket as exc:
            self.metrics.inc("connections_refused", reason="malformed")
            raise Close(f"malformed first packet: {exc.reason}", label="malformed") from None
        if not isinstance(packet, Connect):  # never: read with only=CONNECT (narrows the type)
            raise Close("first packet is not CONNECT", label="malformed")
        return packet

    async def _client_id_of(self, packet: Connect) -> str:
        client_id = packet.client_id
        if not client_id:
            if not packet.clean_session:
                await self._refuse(
                    ConnackCode.IDENTIFIER_REJECTED,
                    "empty client id with a persistent session",
                    "client_id",
                )
            client_id = f"auto-{uuid.uuid4().hex}"
        elif len(client_id.encode()) > self.server.limits.max_client_id_bytes or any(
            ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in client_id
        ):
            await self._refuse(
                ConnackCode.IDENTIFIER_REJECTED, f"client id {client_id[:64]!r}", "client_id"
            )
        self._client_id = client_id
        return client_id

    async def _peer_certificate(self, ssl_object: ssl.SSLObject | None) -> bytes | None:
        if ssl_object is None:
            return None
        if ssl_object.session_reused:
            # The certificate was verified in an earlier handshake, against the CA and CRL
            # of then: it is not evidence of anything now (SPEC §6).
            await self._refuse(
                ConnackCode.NOT_AUTHORIZED,
                "resumed TLS session (the client certificate was not verified again)",
                "tls session resumed",
            )
        certificate: bytes | None = ssl_object.getpeercert(binary_form=True)
        return certificate

    async def _authenticate(self, request: ConnectRequest) -> Identity:
        try:
            async with asyncio.timeout(self.server.limits.connect_timeout):
                decision = await self.server.authenticator.authenticate(request)
        except TimeoutError:
            await self._refuse(ConnackCode.SERVER_UNAVAILABLE, "authentication timed out", "auth")
        except asyncio.CancelledError:
            if self._stopping():
                # The server stops while it judges this CONNECT: "server unavailable", not a
                # close without a word, which a client may read as its certificate refused
                # (our agent does within 3 s of the handshake) and back off slowly.
                self.writer.write(encode_connack(ConnackCode.SERVER_UNAVAILABLE))
            raise
        if isinstance(decision, Refusal):
            await self._refuse(decision.code, decision.reason, decision.label or decision.reason)
        return decision

    async def _refuse(
        self, code: ConnackCode, reason: str, label: str, *, quiet: bool = False
    ) -> NoReturn:
        """Send a refusing CONNACK, then end the connection (raises `Close`)."""
        self.metrics.inc("connections_refused", reason=label)
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "%s: refused CONNECT from %s (client id %r): %s",
            self.server.name, self.peer, self._client_id, reason,
        )  # fmt: skip
        self.writer.write(encode_connack(code))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.writer.drain()
        raise Close(f"CONNECT refused: {reason}", label="refused")


def _intermediates(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, ...]:
    """The intermediates of the peer's verified chain (DER, leaf side first): the chain without
    the leaf and its last certificate (the trust anchor, from the server's own store), at most
    `MAX_PEER_CHAIN`. Python 3.13 has ``get_verified_chain``; 3.11 and 3.12 the same method
    on the private ``_sslobj`` (``_ssl.Certificate`` objects). () if neither is there."""
    public = getattr(ssl_object, "get_verified_chain", None)
    if public is not None:
        chain = [bytes(der) for der in public()]
    else:
        private = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
        if private is None:
            return ()
        chain = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in private()]  # type: ignore[attr-defined]
    return tuple(chain[1:-1][:MAX_PEER_CHAIN])
