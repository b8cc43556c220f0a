"""A small PKI for the bridge (SPEC §8): a CA, sink and device certificates, a CRL.

Layout of a PKI directory::

    ca.pem  ca.key            the CA (key mode 0600)
    index.json                every certificate issued: serial, kind, name, validity, revocation
    .lock                     held (flock) around every change to the directory (`certs.lock`)
    crl.pem                   written by `CertificateAuthority.write_crl` (and by `revoke`)
    crlnumber                 the highest CRL number recorded, to any path (numbers only go up)
    servers/NAME.pem .key     sink server certificates
    devices/ID.pem  .key      device certificates (CN = device id, SAN URI ``urn:device:ID``)
    .NAME.key.pending         a key waiting for its certificate (`certs.issuance`)
    ..NAME.key.pending.*.tmp  left by a run killed while writing that key; removed when settled

Nothing is ever overwritten: a certificate or key file that exists already is an error raised
before anything is written (a CRL replaces only a CRL of the same CA). Two runs at once (a
provisioning line issuing while an operator revokes) are serialized by ``.lock``, so neither
undoes the other's change to the index. Private keys are created with mode 0600, fsynced and
linked into place atomically (STYLE 14), only once their certificate is in place; a run killed
part way is settled by the next issuance (`certs.issuance`). ``index.json`` is replaced
atomically.

A PKI directory that cannot be written (an offline CA on read-only media) still serves ``list``
and `write_crl` to a path elsewhere: that CRL's number cannot be recorded in ``crlnumber``, so it
is numbered by the clock instead, and the call returns only once the clock has passed it (see
`_crl_for`). Everything that changes the directory is `ReadOnlyPki`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.crls import Signer
from certs.errors import (
    CaMissing,
    KeyUnreadable,
    OutputExists,
    PkiError,
    ReadOnlyPki,
    interrupted_init,
)
from certs.files import refuse_existing, replace_file, write_new
from certs.index import CertKind, CertRecord, new_record, read_index
from certs.issuance import discard, pending_key_path, settle, write_pair
from certs.keys import KeyType, generate_key, key_pem, load_private_key
from certs.names import (
    MAX_COMMON_NAME,
    device_uri,
    dns_name,
    format_serial,
    parse_serial,
    subject_name,
)
from certs.profiles import ca_certificate, leaf_certificate
from certs.validity import now as _now
from certs.validity import validity as _validity
from mqtt_ingest import failpoints
from mqtt_ingest.disk import temporaries
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id

__all__ = [
    "CaMissing",
    "CertRecord",
    "CertificateAuthority",
    "ExistsAfterSettling",
    "Issued",
    "KeyType",
    "KeyUnreadable",
    "OutputExists",
    "PkiError",
    "ReadOnlyPki",
    "device_uri",
    "format_serial",
    "generate_key",
    "load_private_key",
    "read_index",
    "replace_file",
    "write_new",
]

DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_DAYS = 397  # the CA/Browser Forum ceiling, a habit worth keeping
DEFAULT_DEVICE_DAYS = 365


@dataclass(frozen=True)
class Issued:
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    settled: tuple[CertRecord, ...] = ()
    """Issuances of earlier runs, killed part way, that this one settled first (each now
    ``complete`` or ``abandoned``, see `certs.issuance`)."""
    removed: tuple[Path, ...] = ()
    """Temporary files of those runs' key writes, removed as they were settled."""

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


class ExistsAfterSettling(OutputExists):
    """`OutputExists` from an issuance that first settled earlier runs killed part way: that is
    done and saved, so it comes with the refusal (``settled``, ``removed``: as in `Issued`).
    ``completed``: the settled record whose file ``path`` is, a run killed once it had
    completed its issuance; the message says so."""

    def __init__(
        self,
        path: Path,
        settled: tuple[CertRecord, ...],
        removed: tuple[Path, ...],
        completed: CertRecord | None,
    ) -> None:
        why = (
            ""
            if completed is None
            else f": an earlier run, interrupted, had completed its issuance (serial"
            f" {format_serial(completed.serial)}, now marked complete)"
        )
        super().__init__(path, why)
        self.settled = settled
        self.removed = removed


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority(Signer):
    """The CA of one PKI directory; load it with `open`, create it with `create`. (Its CRLs,
    the index and the lock: `certs.crls.Signer`.)"""

    # -- paths -----------------------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        common_name: str = "Edge Bridge CA",
        key_type: KeyType = KeyType.EC_P256,
        days: float = DEFAULT_CA_DAYS,
        not_before: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """Create a self-signed CA in ``directory``; `OutputExists` if one is there already (or
        an earlier CA's ``index.json`` or ``crl.pem``). When it fails, nothing it wrote is left."""
        directory = Path(directory)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        index = directory / "index.json"
        if key_path.exists() and not cert_path.exists() and not index.exists():
            raise PkiError(interrupted_init(key_path))
        # An index or CRL left by an earlier CA would list its certificates as this one's.
        refuse_existing([cert_path, key_path, index, directory / "crl.pem"])
        name = subject_name(common_name, "the CA's --cn")
        start, end = _validity(not_before, days)
        key = generate_key(key_type)
        cert = ca_certificate(name, key, start, end)
        ca = cls(directory, cert, key)  # its directory is made by the lock (`ReadOnlyPki`)
        # The files first, the index last, all under the lock: a failure leaves nothing behind
        # (an index left alone would make every later init-ca refuse the directory), and an
        # init-ca that ran meanwhile is refused by the check again, before anything is written.
        written: list[Path] = []
        with ca._locked("create a CA"):
            try:
                refuse_existing([cert_path, key_path, ca.index_path, ca.crl_path])
                # A CA key of an init-ca killed before its link: it never had its name, so
                # nothing was signed with it (after the link, ca.key is there: refused above).
                for stray in temporaries(key_path, mode=0o600):
                    stray.unlink()
                write_new(key_path, key_pem(key), 0o600)
                written.append(key_path)
                failpoints.hit("certs.init_ca.after_key")
                write_new(cert_path, _cert_pem(cert), 0o644)
                written.append(cert_path)
                written.append(ca.index_path)  # it was not there: whatever is there is ours
                record = new_record(
                    cert,
                    "ca",
                    common_name,
                    directory=directory,
                    cert_path=cert_path,
                    key_path=key_path,
                    issuance="complete",
                )
                ca._save([record])
            except BaseException:
                # Only what this call wrote: an init-ca of another version may have won.
                for path in reversed(written):
                    path.unlink(missing_ok=True)
                raise
        return ca

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        """Load the CA of ``directory``; `CaMissing` or `KeyUnreadable` if it cannot be used."""
        directory = Path(directory)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        if not cert_path.is_file() or not key_path.is_file():
            raise CaMissing(directory)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise PkiError(
                f"cannot read CA certificate {cert_path}: not a PEM certificate"
            ) from exc
        key = load_private_key(key_path)
        if key.public_key() != cert.public_key():
            raise KeyUnreadable(key_path, f"it does not match the certificate {cert_path}")
        return cls(directory, cert, key)

    # -- issuing ---------------------------------------------------------------------------

    def issue_server(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        *,
        name: str | None = None,
        key_type: KeyType = KeyType.EC_P256,
        days: float = DEFAULT_SERVER_DAYS,
        not_before: dt.datetime | None = None,
        cert_path: Path | None = None,
        key_path: Path | None = None,
    ) -> Issued:
        """Issue a TLS server certificate (for the sink, or a test broker) for these names."""
        if not dns_names and not ip_addresses:
            raise PkiError("a server certificate needs at least one --dns name or --ip address")
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for text in ip_addresses:
            try:
                ips.append(ipaddress.ip_address(text))
            except ValueError:
                raise PkiError(f"{text!r} is not an IP address") from None
        names = [dns_name(dns) for dns in dns_names]
        label = name or (names[0] if names else str(ips[0]))
        if any(c in label for c in "/\x00") or label.startswith("."):
            raise PkiError(f"{label!r} cannot name a file; pass --name")
        if len(label) > MAX_COMMON_NAME:
            raise PkiError(
                f"{label[:20]!r}... is {len(label)} characters, the certificate's CN holds"
                f" {MAX_COMMON_NAME}: pass --name (a shorter name for its files and CN)"
            )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in names]
        sans += [x509.IPAddress(ip) for ip in ips]
        return self._issue(
            kind="server",
            name=label,
            common_name=label,
            sans=sans,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            key_type=key_type,
            days=days,
            not_before=not_before,
            cert_path=cert_path or self.directory / "servers" / f"{label}.pem",
            key_path=key_path or self.directory / "servers" / f"{label}.key",
        )

    def issue_device(
        self,
        device_id: str,
        *,
        key_type: KeyType = KeyType.EC_P256,
        days: float = DEFAULT_DEVICE_DAYS,
        not_before: dt.datetime | None = None,
        cert_path: Path | None = None,
        key_path: Path | None = None,
    ) -> Issued:
        """Issue a device client certificate: CN = device id, SAN URI ``urn:device:<id>``."""
        try:
            validate_device_id(device_id)
        except InvalidIdentifier as exc:
            raise PkiError(str(exc)) from exc
        subject_name(device_id, "a device id")  # the sink reads the identity from the CN
        return self._issue(
            kind="device",
            name=device_id,
            common_name=device_id,
            sans=[x509.UniformResourceIdentifier(device_uri(device_id))],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            key_type=key_type,
            days=days,
            not_before=not_before,
            cert_path=cert_path or self.directory / "devices" / f"{device_id}.pem",
            key_path=key_path or self.directory / "devices" / f"{device_id}.key",
        )

    def _issue(
        self,
        *,
        kind: CertKind,
        name: str,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        key_type: KeyType,
        days: float,
        not_before: dt.datetime | None,
        cert_path: Path,
        key_path: Path,
    ) -> Issued:
        start, end = _validity(not_before, days)
        # Beyond its CA's end a certificate fails verification anyway: say so by its dates.
        end = min(end, self.certificate.not_valid_after_utc)
        if end <= start:
            raise PkiError(
                f"the CA expires at {self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC,"
                " before the requested validity starts"
            )
        key = generate_key(key_type)
        cert = leaf_certificate(
            self.certificate,
            self.key,
            self._authority_key_identifier(),
            key.public_key(),
            common_name=common_name,
            sans=sans,
            usage=usage,
            key_encipherment=isinstance(key, rsa.RSAPrivateKey),
            start=start,
            end=end,
        )
        with self._locked("issue a certificate"):
            before = self.records()
            records, strays = settle(self.directory, before, self.certificate)
            settled = tuple(r for r, was in zip(records, before, strict=True) if r != was)
            removed = tuple(strays)
            if settled:
                self._save(records)
            # Checked once settled: a killed run's leftover certificate is no reason to refuse.
            # The pending name too: what is there now is not this run's to remove on failure.
            try:
                refuse_existing([cert_path, key_path, pending_key_path(key_path)])
            except OutputExists as exc:
                if settled or removed:  # done and saved: reported with the refusal
                    completed = self._completed_at(exc.path, settled)
                    raise ExistsAfterSettling(exc.path, settled, removed, completed) from None
                raise
            # Recorded first (`certs.issuance`): a certificate on disk that the index does not
            # list could never be revoked.
            record = new_record(
                cert,
                kind,
                name,
                directory=self.directory,
                cert_path=cert_path,
                key_path=key_path,
                issuance="started",
            )
            self._save([*records, record])
            try:
                write_pair(cert_path, _cert_pem(cert), key_path, key_pem(key))
            except BaseException:
                # A record whose certificate was never written is dropped; one whose certificate
                # was on disk, if only for a moment, stays known.
                written = discard(cert_path, key_path, cert.serial_number, self.certificate)
                kept = [dataclasses.replace(record, issuance="abandoned")] if written else []
                self._save([*records, *kept])
                raise
            self._save([*records, dataclasses.replace(record, issuance="complete")])
        return Issued(cert_path, key_path, cert, settled, removed)

    def _completed_at(self, path: Path, settled: Sequence[CertRecord]) -> CertRecord | None:
        """The record of ``settled`` marked complete whose certificate or key is at ``path``."""
        spelled = os.path.abspath(path)  # however it is spelled
        for record in settled:
            files = [record.cert_file(self.directory), record.key_file(self.directory)]
            ours = {os.path.abspath(f) for f in files if f is not None}
            if record.issuance == "complete" and spelled in ours:
                return record
        return None

    # -- the index, revocation, CRL --------------------------------------------------------

    def revoke(self, target: str, *, crl_days: float | None = None) -> list[CertRecord]:
        """Revoke by device id (every unrevoked certificate of that device) or by serial.

        A serial is given in hex (``0x`` prefix and colons optional), as ``list`` prints it.
        The CRL is rewritten, valid for ``crl_days`` or, by default, as long as the CRL it
        replaces was (else `DEFAULT_CRL_DAYS`). Returns the records revoked now. If the index
        has every match revoked but ``crl.pem`` does not list them all, the CRL is made again
        and those records are returned. `PkiError` if none matched, or if every match is
        revoked already (in the index and on the CRL).
        """
        with self._locked("revoke"):
            records = self.records()
            # A device id wins over a serial spelled the same; a random 159-bit serial that reads
            # like a real device id is not a practical worry.
            targets = [r for r in records if r.kind == "device" and r.name == target]
            serial = None if targets else parse_serial(target)
            if serial is not None:
                targets = [r for r in records if r.kind != "ca" and r.serial == serial]
            if not targets:
                raise PkiError(f"no certificate issued by this CA matches {target!r}")
            matches = [r for r in targets if r.revoked_at is None]
            if not matches:
                listed = self._crl_serials()
                if all(r.serial in listed for r in targets):
                    raise PkiError(f"{target!r} is revoked already")
                # Revoked in the index, missing from crl.pem (lost, or an earlier version saved
                # the index first and then failed): verifiers read the CRL, so it is made again.
                replace_file(self.crl_path, self._crl_for(self.crl_path, crl_days, records))
                return targets
            stamp = _now().isoformat()
            chosen = {r.serial for r in matches}
            updated = [
                CertRecord(**{**asdict(r), "revoked_at": stamp}) if r.serial in chosen else r
                for r in records
            ]
            # The CRL is made before anything is written (one that cannot be made, by its
            # --days, changes nothing), and written before the index: if saving the index then
            # fails, the certificate is refused all the same, later CRLs keep it (`_crl_for`
            # carries our CRL's entries over), and revoking again records it.
            replace_file(self.crl_path, self._crl_for(self.crl_path, crl_days, updated))
            self._save(updated)
        return [r for r in updated if r.serial in chosen]
