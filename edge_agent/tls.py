"""The device's TLS material for the uplink: the client context (CA, certificate, key, the CA's
CRL for the sink's certificate), loaded and checked once and reused for every connection, and
loaded again when the CRL file changes (SPEC §5, §6)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.config import UplinkConfig
from edge_agent.link import LinkFailure
from mqtt_ingest.crl import TlsError, crl_rollback, load_crl
from mqtt_ingest.identity import certificate_identities

__all__ = [
    "CRL_REFUSED",
    "DeviceTls",
    "TlsMaterial",
    "chains_to",
    "client_context",
    "file_version",
    "issued_by",
    "key_matches",
]

log = logging.getLogger(__name__)

CRL_REFUSED = "the sink's certificate cannot be checked with it, so the sink is refused"
UNUSABLE_CRL = "unusable CRL"  # how `TlsMaterial.load` starts a refusal of the CRL itself


def client_context(config: UplinkConfig) -> ssl.SSLContext:
    """Verify the server against ``tls.ca``, the host name and ``tls.crl`` if set; present the
    device certificate. Raises `TlsError` for an unusable CRL."""
    return _client_context(config)[0]


def _client_context(
    config: UplinkConfig,
) -> tuple[ssl.SSLContext, x509.CertificateRevocationList | None, bytes | None]:
    """`client_context`, the CRL loaded into it and the bytes it was loaded from."""
    tls = config.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.crl is None:
        return context, None, None
    crl, data = load_crl(context, tls.crl, tls.ca, refused=CRL_REFUSED)
    return context, crl, data


def file_version(path: Path) -> tuple[int, int, int] | None:
    """What tells a file's versions apart (mtime, size, inode); None if it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


@dataclass(frozen=True)
class TlsMaterial:
    """The device's TLS setup, loaded and checked once (at start, on reload and when the CRL
    file changes), then reused for every connection: a file broken on disk later does not break
    the link; SIGHUP loads anew."""

    context: ssl.SSLContext
    not_before: float  # unix seconds
    not_after: float
    crl_version: tuple[int, int, int] | None = None  # `file_version` of the CRL loaded
    crl_next_update: float | None = None  # unix seconds
    crl_digest: bytes | None = None  # of the CRL file's content: rewritten unchanged, no reload
    crl: x509.CertificateRevocationList | None = None
    identities: frozenset[str] = frozenset()  # the device ids the certificate names
    issued_by_ca: bool | None = False
    """The certificate was issued by a CA certificate of ``tls.ca`` (through the intermediates of
    its file); None: not known (a CA file in a form only OpenSSL reads)."""

    @classmethod
    def load(cls, config: UplinkConfig) -> TlsMaterial:
        """Raise ValueError saying what is wrong with the files."""
        tls = config.tls
        crl_version = None if tls.crl is None else file_version(tls.crl)
        try:
            certificate, *chain = x509.load_pem_x509_certificates(tls.cert.read_bytes())
            context, crl, crl_data = _client_context(config)
            authorities = _authorities(tls.ca.read_bytes())
        except TlsError as exc:
            raise ValueError(f"{UNUSABLE_CRL}: {exc}") from None
        # Before OSError, which ssl.SSLError is: a broken key or CA file names the files.
        except (ValueError, ssl.SSLError) as exc:
            raise ValueError(
                f"unusable TLS files ({tls.cert}, {tls.key}, {tls.ca}): {exc}"
            ) from None
        except OSError as exc:
            raise ValueError(f"cannot read the TLS files: {exc}") from None
        next_update = None if crl is None else crl.next_update_utc
        return cls(
            context,
            certificate.not_valid_before_utc.timestamp(),
            certificate.not_valid_after_utc.timestamp(),
            crl_version,
            None if next_update is None else next_update.timestamp(),
            None if crl_data is None else crl_digest(crl_data),
            crl,
            frozenset(certificate_identities(certificate)),
            None if authorities is None else chains_to(certificate, chain, authorities),
        )


def _authorities(data: bytes) -> list[x509.Certificate] | None:
    """The CA file's certificates; None for a form OpenSSL reads (it loaded the file) and
    ``cryptography`` does not (``TRUSTED CERTIFICATE``, as in ``ca-bundle.trust.crt``)."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return None


def chains_to(
    certificate: x509.Certificate,
    chain: list[x509.Certificate],
    authorities: list[x509.Certificate],
) -> bool:
    """Whether ``certificate`` was issued by one of ``authorities``, directly or through the
    intermediates of ``chain`` (the rest of its file, as OpenSSL sends it). Signatures only, as
    the sink judges a chain's anchor again at a reload: OpenSSL verifies the rest."""
    current, left = certificate, list(chain)
    for _ in range(len(chain) + 1):
        if any(issued_by(current, ca) for ca in authorities):
            return True
        parent = next((c for c in left if issued_by(current, c)), None)
        if parent is None:
            return False
        left.remove(parent)
        current = parent
    return False


def _problems(
    material: TlsMaterial, config: UplinkConfig, device_id: str, now: float
) -> dict[str, str]:
    """What keeps ``material`` from working at unix time ``now``, by kind (`rotation_refusal`)."""
    cert = config.tls.cert
    problems = {}
    if now > material.not_after:
        problems["validity"] = f"the certificate {cert} expired at {_utc(material.not_after)}"
    elif now < material.not_before:
        problems["validity"] = (
            f"the certificate {cert} is not valid before {_utc(material.not_before)} "
            "(check the clock)"
        )
    if config.token.mode != "none" and device_id not in material.identities:
        named = " / ".join(sorted(material.identities)) or "no single CN nor device SAN URI"
        problems["identity"] = (
            f"{cert} is the certificate of {named}, not of device_id {device_id!r}"
        )
    if material.issued_by_ca is False:
        problems["issuer"] = f"the certificate {cert} was not issued by a CA in {config.tls.ca}"
    return problems


def key_matches(key: PrivateKeyTypes, certificate: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``certificate``."""
    public = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return public == certificate.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``certificate``."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def crl_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class DeviceTls:
    """The uplink's `TlsMaterial` for one configuration: loaded at the first connection (or
    given, by a reload that loaded it), checked against the clock at every connection, and
    loaded again when the CRL file changes. A broken file later keeps what was loaded."""

    def __init__(self, config: UplinkConfig, material: TlsMaterial | None = None) -> None:
        self.config = config
        self.material = material
        self._crl_blocked = ""  # why a changed CRL could not be loaded (the other TLS files)
        crl = config.tls.crl
        self._seen = None if crl is None else file_version(crl)  # before anything loaded

    def current(self, now: float) -> TlsMaterial:
        """The material for a connection at unix time ``now`` (loaded now if it never loaded,
        and again if the CRL changed); `LinkFailure` (refused) for files that cannot be used,
        a CRL past its next update or a certificate not valid ``now``."""
        if self.material is None:
            try:
                self.material = TlsMaterial.load(self.config)
            except ValueError as exc:
                raise LinkFailure(str(exc), refused=True) from None
        crl = self.config.tls.crl
        if crl is not None and file_version(crl) != self.material.crl_version:
            self.material = self._changed_crl(self.material, crl)
        material = self.material
        if material.crl_next_update is not None and now >= material.crl_next_update:
            raise LinkFailure(
                f"the CRL {crl} expired at {_utc(material.crl_next_update)} (its next update): "
                f"{CRL_REFUSED}; fetch a fresh one (bridge-certs crl)",
                refused=True,
            )
        if now < material.not_before:
            raise LinkFailure(
                f"the device certificate is not valid before {_utc(material.not_before)} (check"
                " the clock)",
                refused=True,
            )
        if now > material.not_after:
            raise LinkFailure(
                f"the device certificate expired at {_utc(material.not_after)}", refused=True
            )
        return material

    def crl_changed(self) -> bool:
        """Look at the CRL file (the uplink does every few seconds): whether the connection
        should be renewed now, because a new CRL loaded (the sink is then checked against it,
        not at the next reconnect, up to a token's lifetime away), or because the file changed
        while nothing could be loaded yet (a fresh CRL after an expired one ends a slow
        back-off)."""
        crl = self.config.tls.crl
        material = self.material
        if crl is None:
            return False
        if material is None:  # nothing loaded yet (an unusable CRL at start): try it now
            version, self._seen = self._seen, file_version(crl)
            return version != self._seen
        if file_version(crl) == material.crl_version:
            return False
        self.material = self._changed_crl(material, crl)
        if self.material is not material and self.material.context is not material.context:
            log.info("uplink: reconnecting to check the sink against the new CRL")
            return True
        return False

    def _changed_crl(self, material: TlsMaterial, crl: Path) -> TlsMaterial:
        """The material with the CRL file as it is now; if that cannot be used, the previous
        material (which an expired CRL then refuses), said once per version of the file. The
        version is taken before the file is read: one that changes while it is read (a copy
        finishing) is read again at the next look."""
        version = file_version(crl)
        try:
            same = crl_digest(crl.read_bytes()) == material.crl_digest
        except OSError:
            same = False
        if same:  # rewritten with the same content (a periodic fetch): nothing to do
            return dataclasses.replace(material, crl_version=version)
        try:
            loaded = TlsMaterial.load(self.config)
        except ValueError as exc:
            if not str(exc).startswith(UNUSABLE_CRL):
                # The certificate or key, not the CRL (a rotation half done): the CRL is read
                # again at the next look, and the reload that follows a rotation loads it too.
                if str(exc) != self._crl_blocked:
                    log.warning("uplink: a new CRL waits for the TLS files to be usable: %s", exc)
                self._crl_blocked = str(exc)
                return material
            log.warning("uplink: the CRL changed but cannot be used, keeping the previous: %s", exc)
            return dataclasses.replace(material, crl_version=version)
        self._crl_blocked = ""
        rollback = self.rollback(loaded, self.config.tls.ca)
        if rollback is not None:
            log.warning(
                "uplink: the CRL changed to an older one, keeping the previous: %s", rollback
            )
            return dataclasses.replace(material, crl_version=version)
        log.info("uplink: CRL %s loaded (changed on disk)", crl)
        return dataclasses.replace(loaded, crl_version=version)

    def rotation_refusal(
        self, loaded: TlsMaterial, config: UplinkConfig, device_id: str, now: float
    ) -> str | None:
        """Why ``loaded`` (new files, by a reload at unix time ``now``) cannot work where the
        material in use can, or None: a certificate not valid now, one that does not name
        ``device_id`` (our sink refuses it; with ``[uplink.token] mode = "none"`` a standard
        broker may not care), or one not issued by a CA of ``tls.ca`` (a certificate of another
        PKI: the sink refuses it at the handshake). Taken, each of them took a working link
        down. A problem the material in use has too (an expired certificate reloaded with a
        new topic policy), or no material in use yet, refuses nothing: no link to keep."""
        in_use = self.material
        if in_use is None:
            return None
        new, old = (
            _problems(loaded, config, device_id, now),
            _problems(in_use, config, device_id, now),
        )
        return next((text for kind, text in new.items() if kind not in old), None)

    def rollback(self, loaded: TlsMaterial, ca: Path) -> str | None:
        """Why ``loaded``'s CRL (checked against ``ca``) is older than the one in use
        (`crl_rollback`), or None."""
        if self.material is None or self.material.crl is None or loaded.crl is None:
            return None
        return crl_rollback(loaded.crl, self.material.crl, ca)


def _utc(unix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, dt.UTC)
