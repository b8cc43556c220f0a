"""The listener's TLS context, and reloading it (new CRL) without a restart (SPEC §6).

An asyncio server keeps the `ssl.SSLContext` it was started with, so the sink starts it with a
*base* context whose ``sni_callback`` hands each new connection the *current* context. OpenSSL
calls that callback while it processes the ClientHello, whether or not the client sent a server
name, and before the client certificate is verified; the swapped-in context's certificate store
(CA and CRL) then decides. Connections already open are re-checked by the sink after each reload
(``on_reload``): a device the new CRL revokes is disconnected, and so is one whose certificate chain
is no longer anchored in the new CA file (`TrustStore`).

`TlsReloader.run` rebuilds the context on request (SIGHUP) and when the CRL file changes (its
mtime, size or inode, polled every ``interval`` seconds). A new CRL is checked before it is used:
it must parse as one PEM CRL signed by the configured CA, be valid now (OpenSSL refuses every
client certificate against a CRL past its next update), and loading it must add no certificate
to the trust store (a certificate pasted into the CRL file would otherwise become a trusted CA).
An invalid file is refused with one log line and the previous context stays in use. A version of
the file is done with once it is in use, or refused for a reason time cannot fix (broken, not the
CA's, expired, older than the CRL in use); refused for one it can (not valid yet, the server
certificate or key being replaced), it is tried again every ``interval``, and said once. A new
CRL that is valid while the certificate or key is not has its revocations applied all the same
(refused at CONNECT, open connections closed) until the context can be rebuilt with it. The CRL in
use is announced a day before its next update (a warning), and once it has passed (an error).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import datetime as dt
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from cloud_sink.config import ListenerConfig
from mqtt_ingest.crl import DEVICES_REFUSED, TlsError, check_crl, crl_rollback, load_crl

__all__ = [
    "CertificateKey",
    "Revocations",
    "TlsError",
    "TlsReloader",
    "TrustStore",
    "build_context",
    "certificate_key",
    "check_crl",
    "set_read_buffer",
]

log = logging.getLogger(__name__)

CRL_WARN_BEFORE = dt.timedelta(days=1)
"""How long before the CRL's next update the sink warns (once) that it needs a fresh one."""


CertificateKey = tuple[bytes, int]
"""A certificate as a CRL names it: (issuer name, DER), serial number."""


def certificate_key(certificate: x509.Certificate) -> CertificateKey:
    return certificate.issuer.public_bytes(), certificate.serial_number


class Revocations:
    """What a CRL revokes, as a set: one lookup per certificate, however long the CRL (a scan
    of a 10,000-entry CRL per connected device stalled the loop for seconds at a reload)."""

    def __init__(self, crl: x509.CertificateRevocationList | None = None) -> None:
        issuer = crl.issuer.public_bytes() if crl is not None else b""
        self._keys = frozenset((issuer, entry.serial_number) for entry in crl or ())

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __contains__(self, key: CertificateKey) -> bool:
        return key in self._keys


class TrustStore:
    """The CA certificates of a TLS context, as OpenSSL loaded them from the CA file, to judge
    again whether a connection already open is anchored in them (its handshake used the store
    of its moment).

    OpenSSL verified the whole chain at the handshake; after a change of the CA file the only
    question is whether its anchor is still there: the top of the chain the connection verified
    with (its last intermediate, or the leaf if it had none) must be directly issued by one of
    these certificates (issuer name and signature: RSA, EC, Ed25519 or Ed448), or be one.
    Nothing else is judged again: not the chain's policy (cryptography's RFC 5280 path
    validation, used before, refused what OpenSSL takes: Ed25519 CAs, version 1 roots), nor
    the CA certificate's own validity or whether a certificate of the file that issued it is
    itself anchored by a root of the file."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.certificates = frozenset(context.get_ca_certs(binary_form=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustStore):
            return NotImplemented
        return self.certificates == other.certificates

    def __hash__(self) -> int:
        return hash(self.certificates)

    def verifier(self) -> Callable[[bytes, Sequence[bytes]], str | None]:
        """``check(leaf DER, intermediates DER)``: None if the chain's top is issued by (or is)
        one of the certificates, else why not. A top shared by many connections (an
        intermediate) is judged once per verifier."""
        issuers: dict[bytes, list[x509.Certificate]] = {}
        for der in sorted(self.certificates):
            certificate = x509.load_der_x509_certificate(der)
            issuers.setdefault(certificate.subject.public_bytes(), []).append(certificate)
        judged: dict[bytes, str | None] = {}

        def anchored(top: bytes) -> str | None:
            if top in self.certificates:
                return None
            try:
                certificate = x509.load_der_x509_certificate(top)
            except ValueError as exc:
                return f"unreadable certificate: {exc}"
            for issuer in issuers.get(certificate.issuer.public_bytes(), ()):
                try:
                    certificate.verify_directly_issued_by(issuer)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return None
            return f"no CA certificate of the file issued {certificate.issuer.rfc4514_string()!r}"

        def check(leaf: bytes, chain: Sequence[bytes]) -> str | None:
            top = chain[-1] if chain else leaf
            if top not in judged:
                judged[top] = anchored(top)
            return judged[top]

        return check


def set_read_buffer(size: int) -> bool:
    """Make asyncio's TLS read buffer ``size`` bytes for every TLS connection of this process
    from now on; False (and one warning) if this Python has no such setting.

    The buffer is ``asyncio.sslproto.SSLProtocol.max_size`` (CPython 3.11 to 3.13: 256 KiB),
    allocated zeroed, so resident, for each connection: of the 304 KB an idle device cost the
    sink, 256 KB (docs/benchmarks.md). It is a class attribute of a private module, so the
    setting is process-wide (the backends' TLS connections too, harmlessly) and checked here.
    """
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if not isinstance(getattr(protocol, "max_size", None), int):
        log.warning("this Python's asyncio has no TLS read buffer size to set: keeping its own")
        return False
    protocol.max_size = size  # type: ignore[union-attr]
    return True


def build_context(listener: ListenerConfig) -> ssl.SSLContext:
    """``CERT_REQUIRED`` against the platform CA, with the CRL checked if one is configured.

    Raises `TlsError` naming the file at fault.
    """
    return _build(listener)[0]


def _build(
    listener: ListenerConfig,
) -> tuple[ssl.SSLContext, x509.CertificateRevocationList | None]:
    """The context and its CRL (None if none is configured)."""
    context = _server_context(listener)
    crl = None
    if listener.crl is not None:
        crl, _ = load_crl(context, listener.crl, listener.ca, refused=DEVICES_REFUSED)
    return context, crl


def _server_context(listener: ListenerConfig) -> ssl.SSLContext:
    """The context without the CRL. Raises `TlsError`, transient (the CRL is not at fault)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(listener.ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"CA {listener.ca}: {exc}", transient=True) from None
    context.verify_mode = ssl.CERT_REQUIRED
    # No session resumption: a resumed handshake does not verify the client certificate again
    # (a device revoked, expired or denied by a new CA file since would get back in with its
    # saved session). No TLS 1.3 tickets, no TLS 1.2 tickets; a TLS 1.2 session id from the
    # server's cache is refused by `TlsReloader._select` (and by the ingest server).
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    try:
        context.load_cert_chain(str(listener.cert), str(listener.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"certificate {listener.cert} / key {listener.key}: {exc}", transient=True
        ) from None
    return context


_Version = tuple[int, int, int]
"""A version of a file: its mtime (ns), size and inode."""


def _fingerprint(path: Path) -> _Version | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TlsReloader:
    """Owns the listener's TLS contexts; `context` is what the server is started with."""

    def __init__(
        self,
        listener: ListenerConfig,
        interval: float,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        self._listener = listener
        self._interval = interval
        self._on_reload = on_reload
        """Called whenever new revocations or a new context are in use (to re-check open
        connections)."""
        # The version before the file is read: a CRL replaced while it is read is loaded again
        # by `run` (taken after, it was the new file's, which was then never loaded).
        self._seen = _fingerprint(listener.crl) if listener.crl is not None else None
        self._current, self.crl = _build(listener)  # `crl`: the current context's
        self.trust = TrustStore(self._current)
        """The CA certificates of the current context."""
        self._newest = self.crl
        """The newest CRL taken: the context's, or one whose revocations alone are in use while
        the context cannot be rebuilt. An older one is a rollback."""
        self.revocations = Revocations(self.crl)
        """What `_newest` revokes (checked at CONNECT and on open connections)."""
        self._said: tuple[_Version | None, str] | None = None
        """The last refusal logged (CRL version, reason): a retry that ends the same is quiet."""
        self._expiry_warned = ""  # "", "soon" or "expired": what was logged for this CRL
        self._current.sni_callback = self._select
        self._base = self._current
        self.reloads = 0
        self.refusals = 0
        """Refusals logged (a version retried for the same reason counts once)."""
        self.resumptions_refused = 0
        """TLS 1.2 handshakes refused because the client offered a cached session."""

    @property
    def context(self) -> ssl.SSLContext:
        """The base context for the server (it forwards every handshake to the current one)."""
        return self._base

    def reload(self, why: str) -> bool:
        """Build a new context from the files now; on failure keep the current one (and log
        why). Returns whether the new one is in use."""
        return self._reload(why, say_again=True)

    def _reload(self, why: str, *, say_again: bool) -> bool:
        """`reload`; unless ``say_again``, a refusal already logged for this version of the CRL
        file is not logged again (`run` retries one refused for a transient reason)."""
        # A few small files, read on the event loop: cheaper than a thread hop.
        path = self._listener.crl
        # The version before the file is read: one replaced meanwhile is read again by `run`.
        version = _fingerprint(path) if path is not None else None
        try:
            context = _server_context(self._listener)
        except TlsError as exc:
            self._blocked(why, exc, version, say_again)
            return False
        try:
            crl = None if path is None else self._new_crl(path, context)
        except TlsError as exc:
            if not exc.transient:
                self._seen = version  # done with: refused until the file changes
            self._refuse(why, exc, version, say_again)
            return False
        self._seen, self._said = version, None
        self._current, self.crl, self._newest = context, crl, crl
        self.trust = TrustStore(context)
        self.revocations = Revocations(crl)
        self._expiry_warned = ""
        self.reloads += 1
        log.info(
            "TLS context reloaded (%s): CRL %s lists %d revoked certificate(s)",
            why, path, 0 if crl is None else len(crl),
        )  # fmt: skip
        if self._on_reload is not None:
            self._on_reload()
        return True

    def _blocked(
        self, why: str, blocked: TlsError, version: _Version | None, say_again: bool
    ) -> None:
        """The CA, certificate or key cannot be used (a rotation half done, say): the context
        stays, and the CRL file, not at fault, is tried again by `run`. A new CRL is judged all
        the same, and if it is valid the devices it revokes are refused at CONNECT and
        disconnected meanwhile (P5: they were let in until the files were whole again)."""
        path = self._listener.crl
        try:
            crl = None if path is None else self._new_crl(path, None)
        except TlsError as exc:
            if not exc.transient:
                self._seen = version
                blocked = TlsError(f"{exc}; and {blocked}")
            self._refuse(why, blocked, version, say_again)
            return
        self._refuse(why, blocked, version, say_again)
        if crl is None or crl == self._newest:
            return
        self._newest, self.revocations = crl, Revocations(crl)
        log.warning(
            "CRL %s is valid but waits for the TLS files to be usable: the %d certificate(s) it"
            " revokes are refused at CONNECT and disconnected meanwhile",
            path, len(crl),
        )  # fmt: skip
        if self._on_reload is not None:
            self._on_reload()

    def _new_crl(
        self, path: Path, context: ssl.SSLContext | None
    ) -> x509.CertificateRevocationList:
        """The CRL file checked, and loaded into ``context`` if there is one; `TlsError` if it
        cannot be used, or is older than `_newest`."""
        ca = self._listener.ca
        if context is None:
            crl = check_crl(path, ca)
        else:
            crl, _ = load_crl(context, path, ca, refused=DEVICES_REFUSED)
        rollback = None if self._newest is None else crl_rollback(crl, self._newest, ca)
        if rollback is not None:
            raise TlsError(f"CRL {path} is older than the one in use: {rollback}")
        return crl

    def _refuse(self, why: str, exc: TlsError, version: _Version | None, say_again: bool) -> None:
        """Log a refusal, unless (``say_again`` False) the same one for the same version was."""
        said = (version, str(exc))
        if said == self._said and not say_again:
            return
        self._said = said
        self.refusals += 1
        retried = f" (tried again every {self._interval:g}s)" if version != self._seen else ""
        log.error("TLS reload (%s) refused, keeping the previous context: %s%s", why, exc, retried)

    def expired(self, now: dt.datetime | None = None) -> str | None:
        """Why no device can connect, if the CRL in use is past its next update (OpenSSL then
        refuses every client certificate), else None."""
        crl = self.crl
        if crl is None or crl.next_update_utc is None:
            return None
        if crl.next_update_utc > (now or dt.datetime.now(dt.UTC)):
            return None
        return f"CRL {self._listener.crl} expired at {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC"

    def check_expiry(self, now: dt.datetime | None = None) -> None:
        """Warn once when the CRL in use is within `CRL_WARN_BEFORE` of its next update, and
        say so again once it has passed (every handshake then fails)."""
        crl = self.crl
        if crl is None or crl.next_update_utc is None:
            return
        now = now or dt.datetime.now(dt.UTC)
        left = crl.next_update_utc - now
        if left <= dt.timedelta(0) and self._expiry_warned != "expired":
            self._expiry_warned = "expired"
            log.error(
                "CRL %s expired at %s: every device is refused until a fresh one is installed",
                self._listener.crl, crl.next_update_utc,
            )  # fmt: skip
        elif dt.timedelta(0) < left <= CRL_WARN_BEFORE and not self._expiry_warned:
            self._expiry_warned = "soon"
            log.warning(
                "CRL %s expires at %s (its next update): install a fresh one before then, or"
                " every device will be refused",
                self._listener.crl, crl.next_update_utc,
            )  # fmt: skip

    async def run(self) -> None:
        """Until cancelled: reload whenever the CRL file changes (SIGHUP calls `reload`)."""
        crl = self._listener.crl
        self.check_expiry()
        while True:
            await asyncio.sleep(self._interval)
            if crl is None:
                continue
            self.check_expiry()
            seen = _fingerprint(crl)
            if seen == self._seen:
                continue
            if seen is None:
                self._seen = seen
                log.error("CRL %s is gone; keeping the previous context", crl)
                continue
            # Also a version refused for a transient reason (not yet valid, the certificate or
            # key being replaced), which stays unseen: tried again every interval.
            self._reload("CRL file changed", say_again=False)

    def _select(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        if ssl_object.session_reused:
            # A TLS 1.2 client offering a session id from the server's cache (Python cannot turn
            # that cache off): the handshake would verify no certificate. Failing it makes the
            # client drop the session and come back with a full handshake.
            self.resumptions_refused += 1
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        current = self._current
        if ssl_object.context is not current:
            ssl_object.context = current
        return None
