"""The running sink: mutual-TLS ingest server -> JWT auth -> topic rights -> core queue."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from cloud_sink.auth import AuthSettings, JwtAuthenticator, PublicKey
from cloud_sink.backends.base import CoreQueue
from cloud_sink.backends.sqlite import SqliteCoreQueue
from cloud_sink.config import AmqpBackendConfig, SinkConfig, SqliteBackendConfig
from cloud_sink.forward import Forwarder
from cloud_sink.rights import DevicePrefixRights
from mqtt_ingest import Counters, IngestServer, Limits
from mqtt_ingest.clock import Clock, SystemClock

__all__ = ["build_server", "open_backend", "server_context"]

log = logging.getLogger(__name__)


def server_context(config: SinkConfig) -> ssl.SSLContext:
    """``CERT_REQUIRED`` against the platform CA, with the CRL checked if one is configured."""
    listener = config.listener
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(listener.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(listener.cert), str(listener.key))
    if listener.crl is not None:
        context.load_verify_locations(cafile=str(listener.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _issuer_keys(config: SinkConfig) -> Mapping[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    for path in config.auth.issuer_keys:
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, PublicKey):
            raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
        keys[path.stem] = key
    return keys


async def open_backend(config: SinkConfig) -> CoreQueue:
    """The configured core queue, connected (amqp and nats need their package extras)."""
    backend = config.backend
    if isinstance(backend, SqliteBackendConfig):
        return await SqliteCoreQueue.open(backend.path)
    if isinstance(backend, AmqpBackendConfig):
        from cloud_sink.backends.amqp import AmqpCoreQueue

        return await AmqpCoreQueue.open(
            url=backend.url,
            exchange=backend.exchange,
            queue=backend.queue,
            queue_type=backend.queue_type,
            dead_letter_exchange=backend.dead_letter_exchange,
            dead_letter_queue=backend.dead_letter_queue,
            timeout=backend.timeout,
        )
    from cloud_sink.backends.nats import NatsCoreQueue

    return await NatsCoreQueue.open(
        url=backend.url,
        stream=backend.stream,
        subject_prefix=backend.subject_prefix,
        dead_letter_stream=backend.dead_letter_stream,
        dead_letter_subject_prefix=backend.dead_letter_subject_prefix,
        duplicate_window=backend.duplicate_window,
        timeout=backend.timeout,
    )


async def build_server(
    config: SinkConfig, *, clock: Clock | None = None
) -> tuple[IngestServer, CoreQueue]:
    """The server (not started) and its core queue (open; close it after the server stops)."""
    auth = config.auth
    settings = AuthSettings(
        audience=auth.audience,
        mode=auth.mode,
        issuer=auth.issuer,
        issuer_keys=_issuer_keys(config),
        leeway=auth.leeway,
        max_lifetime=auth.max_lifetime,
        identity_source=auth.identity,
        deny=frozenset(auth.deny),
    )
    context = server_context(config)
    queue = await open_backend(config)
    metrics = Counters()
    listener = config.listener
    server = IngestServer(
        stage=Forwarder(queue, metrics),
        authenticator=JwtAuthenticator(settings, clock or SystemClock()),
        rights=DevicePrefixRights(config.rights.prefix),
        host=listener.host,
        port=listener.port,
        ssl_context=context,
        limits=Limits(
            connect_timeout=listener.connect_timeout,
            max_packet_size=listener.max_packet_size,
            max_connections=listener.max_connections,
            max_inflight=listener.max_inflight,
        ),
        clock=clock,
        metrics=metrics,
        name="cloud-sink",
    )
    return server, queue
