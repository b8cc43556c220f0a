"""Checking a CRL file before it is used, for the sink (its devices' certificates) and the agent
(the sink's server certificate): OpenSSL refuses every certificate against a CRL it cannot use,
so a CRL is checked first and a bad one is reported with its file and its reason."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["TlsError", "check_crl"]


class TlsError(Exception):
    """The TLS material cannot be used; the message says which file and why."""


def check_crl(
    crl_path: Path,
    ca_path: Path,
    now: dt.datetime | None = None,
    *,
    refused: str = "every device would be refused with it",
) -> x509.CertificateRevocationList:
    """Check that ``crl_path`` holds one PEM CRL signed by a CA certificate of ``ca_path`` and
    valid ``now`` (OpenSSL refuses every certificate against a CRL past its next update or
    before its last update); return it. Raises `TlsError`; ``refused`` says what an unusable
    CRL would do. One PEM block only: loaded as verify locations, a certificate pasted into the
    file would become trusted."""
    try:
        data = crl_path.read_bytes()
        authorities = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise TlsError(f"{ca_path}: not a PEM certificate: {exc}") from None
    if data.count(b"-----BEGIN") != 1 or b"-----BEGIN X509 CRL-----" not in data:
        raise TlsError(f"{crl_path}: expected exactly one PEM 'X509 CRL' block")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise TlsError(f"{crl_path}: not a valid CRL: {exc}") from None
    if not any(_signed_by(crl, authority) for authority in authorities):
        raise TlsError(f"{crl_path}: the CRL is not signed by the CA in {ca_path}")
    now = now or dt.datetime.now(dt.UTC)
    if crl.last_update_utc > now:
        raise TlsError(
            f"{crl_path}: not valid before {crl.last_update_utc:%Y-%m-%d %H:%M:%S} UTC (this"
            f" host's clock is behind?): {refused}"
        )
    if crl.next_update_utc is not None and crl.next_update_utc <= now:
        raise TlsError(
            f"{crl_path}: expired at {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC (its next"
            f" update): {refused}; write a fresh one (bridge-certs crl)"
        )
    return crl


def _signed_by(crl: x509.CertificateRevocationList, authority: x509.Certificate) -> bool:
    key = authority.public_key()
    return (
        authority.subject == crl.issuer
        and isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey)
        and crl.is_signature_valid(key)
    )
