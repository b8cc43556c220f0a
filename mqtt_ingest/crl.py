"""Checking a CRL file before it is used, for the sink (its devices' certificates) and the agent
(the sink's server certificate): OpenSSL refuses every certificate against a CRL it cannot use,
so a CRL is checked first and a bad one is reported with its file and its reason."""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

__all__ = [
    "DEVICES_REFUSED",
    "TlsError",
    "check_crl",
    "crl_number",
    "crl_rollback",
    "load_crl",
]

DEVICES_REFUSED = "every device would be refused with it"
"""What an unusable CRL would do to the sink (``refused`` of `check_crl` and `load_crl`)."""

# The critical extensions OpenSSL handles (crypto/x509/x_crl.c): any other makes it refuse
# every certificate checked against the CRL ("unhandled critical CRL extension").
_CRITICAL_OK = {ExtensionOID.ISSUING_DISTRIBUTION_POINT, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
_CRITICAL_ENTRY_OK = {CRLEntryExtensionOID.CERTIFICATE_ISSUER}


class TlsError(Exception):
    """The TLS material cannot be used; the message says which file and why.

    ``transient``: the files as they are may be usable later (a CRL not valid yet, a file that
    cannot be read now, one being replaced): worth trying again without waiting for the CRL
    file to change. Otherwise the CRL file is refused until it changes.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def check_crl(
    crl_path: Path,
    ca_path: Path,
    now: dt.datetime | None = None,
    *,
    refused: str = DEVICES_REFUSED,
) -> x509.CertificateRevocationList:
    """Check that ``crl_path`` holds one PEM CRL signed by a CA certificate of ``ca_path`` and
    valid ``now`` (OpenSSL refuses every certificate against a CRL past its next update or
    before its last update); return it. Raises `TlsError`; ``refused`` says what an unusable
    CRL would do. One PEM block only: loaded as verify locations, a certificate pasted into the
    file would become trusted."""
    return _checked(_read(crl_path), crl_path, ca_path, now, refused)


def load_crl(
    context: ssl.SSLContext, crl_path: Path, ca_path: Path, *, refused: str
) -> tuple[x509.CertificateRevocationList, bytes]:
    """`check_crl`, then load into ``context`` exactly the bytes checked (the file read once: one
    replaced between a check and OpenSSL's own read put an unchecked CRL in use); return the
    CRL and those bytes. Raises `TlsError`."""
    data = _read(crl_path)
    crl = _checked(data, crl_path, ca_path, None, refused)
    trusted = context.cert_store_stats()["x509"]
    # OpenSSL loads CRLs only from a file (`cadata` takes certificates): a private copy.
    try:
        with tempfile.TemporaryDirectory(prefix="crl-") as directory:
            copy = Path(directory) / "crl.pem"
            copy.write_bytes(data)
            context.load_verify_locations(cafile=str(copy))
    except ssl.SSLError as exc:
        raise TlsError(f"CRL {crl_path}: {exc}") from None
    except OSError as exc:
        raise TlsError(
            f"CRL {crl_path}: cannot make the private copy OpenSSL loads it from, in"
            f" {tempfile.gettempdir()} ($TMPDIR): {exc.strerror or exc}",
            transient=True,
        ) from None
    if context.cert_store_stats()["x509"] != trusted:  # `_checked` allows one CRL block only
        raise TlsError(f"CRL {crl_path}: the file must hold one CRL and no certificate")
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return crl, data


def crl_rollback(
    new: x509.CertificateRevocationList, current: x509.CertificateRevocationList, ca_path: Path
) -> str | None:
    """Why ``new`` (checked against ``ca_path``) is older than ``current`` of the same CA key,
    or None: a CRL put back from a backup or a rolled-back deployment (or replayed by whoever
    can write the file) would let in again every certificate revoked since. CRLs of another key
    are not compared: a CA rotated under the same name (new key, numbers from 1 again)."""
    if new.issuer != current.issuer:
        return None  # another CA (the CA file changed too): nothing to compare
    try:
        authorities = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (OSError, ValueError):
        return None  # `_checked` read it a moment ago: changed since, nothing to compare with
    signers = [authority for authority in authorities if _signed_by(new, authority)]
    if not any(_signed_by(current, signer) for signer in signers):
        return None
    numbers = [crl_number(crl) for crl in (new, current)]
    if numbers[0] is not None and numbers[1] is not None:
        if numbers[0] < numbers[1]:
            return f"its CRL number {numbers[0]} is below {numbers[1]}, the CRL in use's"
        return None
    if new.last_update_utc < current.last_update_utc:
        return (
            f"it was issued at {new.last_update_utc:%Y-%m-%d %H:%M:%S} UTC, before the CRL in use"
            f" ({current.last_update_utc:%Y-%m-%d %H:%M:%S} UTC)"
        )
    return None


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL's number (RFC 5280 5.2.3), None if it has none."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _read(crl_path: Path) -> bytes:
    try:
        return crl_path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {crl_path}: {exc.strerror}", transient=True) from None


def _checked(
    data: bytes, crl_path: Path, ca_path: Path, now: dt.datetime | None, refused: str
) -> x509.CertificateRevocationList:
    # The CA file at fault, not the CRL (a rotation half done, say): transient for the CRL.
    try:
        authorities = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror}", transient=True) from None
    except ValueError as exc:
        raise TlsError(f"{ca_path}: not a PEM certificate: {exc}", transient=True) from None
    if data.count(b"-----BEGIN") != 1 or b"-----BEGIN X509 CRL-----" not in data:
        raise TlsError(f"{crl_path}: expected exactly one PEM 'X509 CRL' block")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise TlsError(f"{crl_path}: not a valid CRL: {exc}") from None
    signers = [authority for authority in authorities if _signed_by(crl, authority)]
    if not signers:
        raise TlsError(f"{crl_path}: the CRL is not signed by the CA in {ca_path}")
    try:
        problem = _unusable(crl, signers)
    except ValueError as exc:  # an extension that does not parse, or one given twice
        raise TlsError(f"{crl_path}: not a valid CRL: {exc}") from None
    if problem is not None:
        raise TlsError(f"{crl_path}: {problem}: {refused}")
    now = now or dt.datetime.now(dt.UTC)
    if crl.last_update_utc > now:
        raise TlsError(
            f"{crl_path}: not valid before {crl.last_update_utc:%Y-%m-%d %H:%M:%S} UTC (this"
            f" host's clock is behind?): {refused}",
            transient=True,  # it becomes valid; an expired one never does
        )
    if crl.next_update_utc is not None and crl.next_update_utc <= now:
        raise TlsError(
            f"{crl_path}: expired at {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC (its next"
            f" update): {refused}; write a fresh one (bridge-certs crl)"
        )
    return crl


def _unusable(crl: x509.CertificateRevocationList, signers: list[x509.Certificate]) -> str | None:
    """What makes OpenSSL refuse every certificate checked against ``crl``, or None."""
    for extension in crl.extensions:
        if isinstance(extension.value, x509.DeltaCRLIndicator):
            return "it is a delta CRL, which cannot be used alone"
        if extension.critical and extension.oid not in _CRITICAL_OK:
            return (
                f"it has a critical extension OpenSSL cannot handle ({extension.oid.dotted_string})"
            )
        if isinstance(extension.value, x509.IssuingDistributionPoint):
            point = extension.value
            # A leaf certificate is out of scope of a CRL for CA or attribute certificates
            # only, or some reasons only (OpenSSL would need another CRL for the rest), and
            # indirect CRLs are not enabled. (A distribution point name works if the
            # certificates name it too, as an external CA's do: left to the operator.)
            if (
                point.only_contains_ca_certs
                or point.only_contains_attribute_certs
                or point.only_some_reasons is not None
                or point.indirect_crl
            ):
                return (
                    "its issuing distribution point limits its scope (OpenSSL: different CRL scope)"
                )
    for revoked in crl:
        try:
            extensions = revoked.extensions
        except ValueError:
            continue  # cryptography cannot read it (a reason code it does not know): OpenSSL may
        for extension in extensions:
            if extension.critical and extension.oid not in _CRITICAL_ENTRY_OK:
                oid = extension.oid.dotted_string
                return f"an entry has a critical extension OpenSSL cannot handle ({oid})"
    for signer in signers:
        try:
            usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return None
        if usage.crl_sign:
            return None
    return "the CA certificate that signed it may not sign CRLs (its key usage lacks cRLSign)"


def _signed_by(crl: x509.CertificateRevocationList, authority: x509.Certificate) -> bool:
    key = authority.public_key()
    return (
        authority.subject == crl.issuer
        and isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey)
        and crl.is_signature_valid(key)
    )
