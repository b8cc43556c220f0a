"""The running sink: mutual-TLS ingest server -> JWT auth -> topic rights -> core queue.

`Sink` owns every part and its tasks: the TLS contexts (CRL reload), the core queue behind its
health guard (outage state, reconnect with backoff), the ingest server and the readiness endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import logging
from types import TracebackType

from cryptography import x509

from cloud_sink.auth import AuthSettings, JwtAuthenticator
from cloud_sink.backends.base import CoreQueue
from cloud_sink.backends.sqlite import SqliteCoreQueue
from cloud_sink.config import AmqpBackendConfig, SinkConfig, SqliteBackendConfig, check_files
from cloud_sink.forward import CALL_MESSAGES, Forwarder
from cloud_sink.health import BackendGuard, BackendState
from cloud_sink.issuer_keys import read_issuer_keys
from cloud_sink.metrics import SinkMetrics
from cloud_sink.readiness import ReadinessServer
from cloud_sink.rights import DevicePrefixRights
from cloud_sink.tls import (
    CertificateKey,
    Revocations,
    TlsError,
    TlsReloader,
    TrustStore,
    build_context,
    certificate_key,
    set_read_buffer,
)
from mqtt_ingest import ConnectRequest, Counters, Identity, IngestServer, Limits, Refusal
from mqtt_ingest.backoff import Backoff
from mqtt_ingest.clock import Clock, SystemClock
from mqtt_ingest.disk import free_bytes
from mqtt_ingest.exposition import MetricsServer
from mqtt_ingest.lifecycle import cancel_until_done

__all__ = ["Sink", "StartAbandoned", "open_backend", "preflight"]

log = logging.getLogger(__name__)


def auth_settings(config: SinkConfig) -> AuthSettings:
    """The authenticator's settings from [auth]; ValueError when an issuer key is unusable."""
    auth = config.auth
    issuer_keys, problems = read_issuer_keys(auth.issuer_keys)
    if problems:
        raise ValueError("; ".join(problems))
    return AuthSettings(
        audience=auth.audience,
        mode=auth.mode,
        issuer=auth.issuer,
        issuer_keys=issuer_keys,
        leeway=auth.leeway,
        max_lifetime=auth.max_lifetime,
        identity_source=auth.identity,
        deny=frozenset(auth.deny),
    )


async def open_backend(config: SinkConfig) -> CoreQueue:
    """The configured core queue, connected (amqp and nats need their package extras)."""
    backend = config.backend
    if isinstance(backend, SqliteBackendConfig):
        return await SqliteCoreQueue.open(backend.path, backend.disk_reserve)
    if isinstance(backend, AmqpBackendConfig):
        from cloud_sink.backends.amqp import AmqpCoreQueue

        return await AmqpCoreQueue.open(
            url=backend.url,
            exchange=backend.exchange,
            queue=backend.queue,
            queue_type=backend.queue_type,
            dead_letter_exchange=backend.dead_letter_exchange,
            dead_letter_queue=backend.dead_letter_queue,
            max_message_size=backend.max_message_size,
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


def preflight(config: SinkConfig) -> list[str]:
    """Every problem with the files the configuration names, as ``config path: problem``:
    missing or unreadable, then (for those that could be read) unusable contents."""
    problems = check_files(config)
    unreadable = {problem.split(":", 1)[0] for problem in problems}
    if not unreadable & {"listener.ca", "listener.cert", "listener.key", "listener.crl"}:
        try:
            build_context(config.listener)
        except TlsError as exc:
            problems.append(f"listener: {exc}")
    _, key_problems = read_issuer_keys(config.auth.issuer_keys)
    problems += [p for p in key_problems if p.split(":", 1)[0] not in unreadable]
    missing = [m for m in _BACKEND_MODULES.get(config.backend.type, ()) if not _importable(m)]
    if missing:
        problems.append(
            f"backend.type: {config.backend.type!r} needs the package's [{config.backend.type}]"
            f" extra (install it from its checkout or wheel as '...[{config.backend.type}]');"
            f" not installed: {', '.join(missing)}"
        )
    return problems


_BACKEND_MODULES = {"amqp": ("aio_pika", "aiormq"), "nats": ("nats",)}
"""What each backend imports from its package extra (pyproject.toml)."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class StartAbandoned(Exception):
    """The start was given up (`Sink`'s ``abandon_on`` set while connecting)."""


class Sink:
    """The whole sink: ``async with Sink(config) as sink:``; leaving the block drains and stops.

    Entering raises `TlsError` (unusable TLS files) or `BackendError` (the core queue cannot be
    opened). ``sink.port`` is the MQTT port, ``sink.health_port`` the readiness endpoint's.
    """

    def __init__(
        self,
        config: SinkConfig,
        *,
        clock: Clock | None = None,
        abandon_on: asyncio.Event | None = None,
    ) -> None:
        """``abandon_on``: set while the core queue is being connected (up to its timeout), the
        start is given up (`StartAbandoned`); `run` passes its stop event."""
        self.config = config
        self._abandon_on = abandon_on
        self.metrics = Counters()
        self._clock = clock
        self._stack = contextlib.AsyncExitStack()
        self._draining = False
        self._at_capacity = False  # (`_full`)
        self._server: IngestServer | None = None
        self._backend: BackendGuard | None = None
        self._tls: TlsReloader | None = None
        self._readiness: ReadinessServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._certificate_keys: dict[bytes, CertificateKey] = {}  # of connected devices
        self._judged: tuple[TrustStore | None, AuthSettings] | None = None
        """The CA certificates and [auth] settings open connections were last judged by."""
        self.prometheus = SinkMetrics(
            self.metrics,
            config.backend.type,
            server=lambda: self._server,
            guard=lambda: self._backend,
            not_ready=self.not_ready,
            crl=lambda: self._tls.crl if self._tls is not None else None,
            disk=self._disk,
        )

    def _disk(self) -> tuple[int, int] | None:
        """(free bytes, disk_reserve) of the sqlite core queue's filesystem; None otherwise."""
        backend = self.config.backend
        if not isinstance(backend, SqliteBackendConfig):
            return None
        try:
            return free_bytes(backend.path.parent), backend.disk_reserve
        except OSError:
            return None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def server(self) -> IngestServer:
        if self._server is None:
            raise RuntimeError("the sink is not started")
        return self._server

    @property
    def backend(self) -> BackendGuard:
        if self._backend is None:
            raise RuntimeError("the sink is not started")
        return self._backend

    @property
    def tls(self) -> TlsReloader:
        if self._tls is None:
            raise RuntimeError("the sink is not started")
        return self._tls

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def health_port(self) -> int:
        if self._readiness is None:
            raise RuntimeError("the readiness endpoint is off ([health] port not set)")
        return self._readiness.port

    @property
    def metrics_port(self) -> int:
        if self._metrics_server is None:
            raise RuntimeError("the metrics endpoint is off ([metrics] port not set)")
        return self._metrics_server.port

    def not_ready(self) -> str | None:
        """None when the sink should get traffic, else why not (for ``/readyz``)."""
        if self._draining:
            return "draining"
        if self._server is None or self._backend is None:
            return "starting"
        if self._backend.state is BackendState.DOWN:
            return f"core queue down: {self._backend.reason}"
        if self._backend.state is BackendState.CLOSED:
            return "stopped"
        # Every TLS handshake fails: a load balancer should send the devices to an instance
        # whose CRL is fresh (this one's may not have been refreshed).
        expired = self._tls.expired() if self._tls is not None else None
        if expired is not None:
            return f"{expired}: every device is refused"
        return self._full(self._server.connection_count)

    def _full(self, count: int) -> str | None:
        """Why not ready at ``count`` connections: at ``max_connections`` every new one is reset
        at once, and a load balancer should send devices elsewhere (it was told "ready"). Ready
        again below 95% of it (at least one below), so that one device leaving and another
        arriving does not flap the answer. (Counted: every connection, those not yet past CONNECT
        too, as the listener counts them.)"""
        most = self.config.listener.max_connections
        if count >= most:
            self._at_capacity = True
        elif count <= min(most - 1, most * 95 // 100):
            self._at_capacity = False
        if not self._at_capacity:
            return None
        return f"full: {count} connections, max_connections {most}"

    def reload(self, config: SinkConfig) -> list[str]:
        """Apply a new configuration to the running sink (SIGHUP): the [auth] section (deny list,
        issuer and keys, audience, leeway, lifetimes, identity source) and a TLS context rebuilt
        with the CA file and the CRL, for the next CONNECTs and the open connections (each judged
        again as its CONNECT would be now: `_revalidate`). Raise ValueError if the new settings
        are unusable (nothing changes then). Returns the sections that changed but only take
        effect after a restart."""
        settings = auth_settings(config)  # ValueError: a key file that cannot be used
        old = self.config
        restart = [
            name for name in ("listener", "rights", "backend", "health", "metrics")
            if getattr(old, name) != getattr(config, name)
        ]  # fmt: skip
        # The TLS files first, at once: refused (an older CRL, a broken file), nothing else of
        # the reload may be applied either. (It was rebuilt later, after [auth] was in use.)
        if self._tls is not None and not self._tls.reload("SIGHUP"):
            raise ValueError("the TLS files cannot be used (logged above): nothing was changed")
        self._authenticator.settings = settings
        self.config = old.model_copy(update={"auth": config.auth})
        self._revalidate()
        return restart

    def _revalidate(self) -> None:
        """Judge the open connections again by what now applies, as their CONNECT would be: a
        credential withdrawn takes effect at once, not at the device's next CONNECT. Closed:
        a device denied (``denied``) or revoked (``revoked``) since it connected; if the CA
        certificates changed since the connections were last judged, one whose certificate
        chain is no longer anchored in them (``untrusted``), and every connection not yet past
        CONNECT (``ca_changed``: its handshake used the old ones; it comes back); if the
        [auth] settings besides the deny list changed, one whose CONNECT they refuse
        (``reauth_refused``), and the others end at the time these settings give (a new leeway
        moves it). The deny list and the CRL cost a set lookup per connection; the rest (a
        chain's anchor, a token verified) only when it changed."""
        if self._server is None:
            return
        settings = self._authenticator.settings
        deny = settings.deny
        tls = self._tls
        revocations = tls.revocations if tls is not None else Revocations()
        trust = tls.trust if tls is not None else None
        judged_trust, judged_settings = self._judged or (trust, settings)
        chain_problem = None
        if trust is not None and trust != judged_trust:
            chain_problem = trust.verifier()
        authenticate = None
        if dataclasses.replace(settings, deny=judged_settings.deny) != judged_settings:
            # Its token was minted for its CONNECT: that its iat has aged since is no reason.
            authenticate = functools.partial(self._authenticator.check, again=True)
        known, seen = self._certificate_keys, {}

        def verdict(
            identity: Identity, request: ConnectRequest
        ) -> tuple[str, str] | Identity | None:
            certificate = request.peer_certificate
            if identity.name in deny:
                return "device is on the deny list", "denied"
            if certificate is not None and revocations:
                key = known.get(certificate)
                if key is None:  # parsed once per connected certificate, not per reload
                    key = certificate_key(x509.load_der_x509_certificate(certificate))
                seen[certificate] = key
                if key in revocations:
                    return "certificate revoked", "revoked"
            if certificate is not None and chain_problem is not None:
                problem = chain_problem(certificate, request.peer_chain)
                if problem is not None:
                    return (
                        f"certificate chain not trusted by the CA file now: {problem}",
                        "untrusted",
                    )
            if authenticate is not None:
                decision = authenticate(request)
                if isinstance(decision, Refusal):
                    return (
                        f"refused by the [auth] settings now: {decision.reason}",
                        "reauth_refused",
                    )
                return decision  # its expiry follows the settings (a new leeway)
            return None

        closed = self._server.close_where(verdict)
        if chain_problem is not None:
            # Their handshake verified the chain with the CA certificates of its moment, and
            # their CONNECT checks only the CRL again: they reconnect against the new ones.
            self._server.close_unauthenticated(
                "the CA file changed since its TLS handshake", "ca_changed"
            )
        self._certificate_keys = seen
        self._judged = trust, settings
        if closed:
            log.warning("closed %d connection(s) whose credentials no longer pass", closed)

    async def _open_backend(self, config: SinkConfig) -> CoreQueue:
        """`open_backend`, given up if `abandon_on` is set meanwhile (`StartAbandoned`)."""
        if self._abandon_on is None:
            return await open_backend(config)
        opening = asyncio.create_task(open_backend(config))
        abandoned = asyncio.create_task(self._abandon_on.wait())
        try:
            await asyncio.wait({opening, abandoned}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandoned.cancel()
        if not opening.done():
            await cancel_until_done([opening])
            if not opening.cancelled() and opening.exception() is None:
                await opening.result().aclose()  # opened all the same (a lost cancellation)
            raise StartAbandoned("stopped while connecting to the core queue")
        return opening.result()

    async def __aenter__(self) -> Sink:
        config = self.config
        listener = config.listener
        settings = auth_settings(config)
        self._tls = TlsReloader(listener, listener.crl_check_interval, self._revalidate)
        tls = self._tls
        self._authenticator = JwtAuthenticator(
            settings, self._clock or SystemClock(), revocations=lambda: tls.revocations
        )
        self._judged = tls.trust, settings
        reconnect = config.backend.reconnect
        queue = await self._open_backend(config)
        stack = self._stack
        try:
            # Exit runs in reverse: server drained, tasks cancelled, endpoint closed, queue closed.
            backend = BackendGuard(queue, Backoff(reconnect.initial, reconnect.max), self.metrics)
            stack.push_async_callback(backend.aclose)
            self._backend = backend
            if config.health.port is not None:
                self._readiness = await stack.enter_async_context(
                    ReadinessServer(config.health.host, config.health.port, self.not_ready)
                )
            if config.metrics.port is not None:
                self._metrics_server = await stack.enter_async_context(
                    MetricsServer(
                        config.metrics.host,
                        config.metrics.port,
                        self.prometheus.registry,
                        name="cloud-sink",
                    )
                )
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._tasks = [
                tasks.create_task(backend.run(), name="cloud_sink.backend_reconnect"),
                tasks.create_task(self._tls.run(), name="cloud_sink.tls_reload"),
            ]
            stack.push_async_callback(lambda: cancel_until_done(self._tasks))
            set_read_buffer(listener.tls_read_buffer)
            server = IngestServer(
                weigh=Forwarder.weight,
                max_weight=CALL_MESSAGES,
                stage=Forwarder(
                    self.prometheus.timed(backend),
                    self.metrics,
                    max_body=self.config.listener.max_packet_size,
                ),
                authenticator=self._authenticator,
                rights=DevicePrefixRights(config.rights.prefix),
                host=listener.host,
                port=listener.port,
                ssl_context=self._tls.context,
                limits=Limits(
                    connect_timeout=listener.connect_timeout,
                    max_packet_size=listener.max_packet_size,
                    max_connections=listener.max_connections,
                    max_inflight=listener.max_inflight,
                    batch_linger=listener.batch_linger,
                ),
                clock=self._clock,
                metrics=self.metrics,
                availability=backend,
                name="cloud-sink",
            )
            self._server = await stack.enter_async_context(server)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Report "draining" on ``/readyz``, stop accepting, let in-flight publishes be confirmed
        and acked (within the server's stop deadline), then close everything. Idempotent."""
        self._draining = True
        await self._stack.aclose()
