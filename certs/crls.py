"""A CA's signing state and its certificate revocation lists: the PKI directory, the CA's
certificate and key, the index, the lock, and the CRLs (`Signer`, which `certs.pki`'s
`CertificateAuthority` extends with creating, opening, issuing and revoking).

CRL numbers only ever increase (RFC 5280 5.2.3): each is recorded in ``crlnumber`` before its
CRL is written, and numbered above every number recorded and every CRL of this CA in place; on
read-only media (``crl --out FILE``), where nothing can be recorded, it is the clock's second,
once the clock is past every recorded number (see `Signer._crl_for`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import lock
from certs.errors import OutputExists, PkiError
from certs.files import replace_file
from certs.index import CertRecord, index_bytes, read_index
from certs.keys import PrivateKey, signing_hash
from certs.validity import now as _now
from certs.validity import validity as _validity
from certs.validity import wait_until as _wait_until
from mqtt_ingest.crl import crl_number

__all__ = ["DEFAULT_CRL_DAYS", "MAX_UNRECORDED_LEAD", "Signer"]

DEFAULT_CRL_DAYS = 7
_CRL_BACKDATE = dt.timedelta(minutes=5)  # a CRL's last update, before now (as certificates)
MAX_UNRECORDED_LEAD = 60
"""Seconds the recorded CRL numbers may run ahead of the clock when a CRL is numbered without
being recorded (read-only media): it waits that long at most, else refuses."""


class Signer:
    """The CA of a PKI directory as far as its index, its lock and its CRLs go."""

    def __init__(self, directory: Path, certificate: x509.Certificate, key: PrivateKey) -> None:
        self.directory = directory
        self.certificate = certificate
        self.key = key

    @property
    def index_path(self) -> Path:
        return self.directory / "index.json"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def crl_number_path(self) -> Path:
        return self.directory / "crlnumber"

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI of what this CA signs: its certificate's SKI, copied. Verifiers match the two
        byte for byte, and a CA made elsewhere need not derive its SKI as we do (SHA-1 of the
        key); only a CA certificate without one gets the AKI computed from its key."""
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def records(self) -> list[CertRecord]:
        return read_index(self.directory)

    def _save(self, records: list[CertRecord]) -> None:
        replace_file(self.index_path, index_bytes(records))  # atomically

    @contextlib.contextmanager
    def _locked(self, action: str) -> Iterator[None]:
        """Hold ``.lock`` exclusively around a change to the directory (`certs.lock`);
        `ReadOnlyPki` naming ``action`` if it cannot be written."""
        with lock.exclusive(self.directory, action):
            yield

    def _our_crl(self, path: Path) -> x509.CertificateRevocationList | None:
        """The CRL in ``path`` if it is one signed by this CA, else None."""
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except (OSError, ValueError):
            return None
        if crl.issuer != self.certificate.subject:
            return None
        public = self.key.public_key()  # the certificate's, checked at open
        return crl if crl.is_signature_valid(public) else None

    def build_crl(
        self,
        *,
        days: float = DEFAULT_CRL_DAYS,
        now: dt.datetime | None = None,
        after: int = 0,
        records: Sequence[CertRecord] | None = None,
        also_revoked: Mapping[int, dt.datetime] | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL of every revoked certificate (of ``records``, by default the index's, and the
        serials of ``also_revoked``, with their revocation dates); its number is the current
        second, or ``after`` + 1 if that is not larger (CRL numbers must increase: RFC 5280
        5.2.3)."""
        now = now or _now()
        _, next_update = _validity(now, days)
        number = max(int(now.timestamp()), after + 1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            # Backdated like certificates: a verifier whose clock is a little behind refuses a
            # CRL "not yet valid", and with it every client certificate.
            .last_update(now - _CRL_BACKDATE)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        revoked = {
            record.serial: dt.datetime.fromisoformat(record.revoked_at)
            for record in (self.records() if records is None else records)
            if record.revoked_at is not None
        }
        for serial, when in {**(also_revoked or {}), **revoked}.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, signing_hash(self.key))

    def write_crl(self, path: Path | None = None, *, days: float | None = None) -> Path:
        """(Re)write the CRL, valid for ``days`` or, by default, as long as the CRL it replaces
        was (else `DEFAULT_CRL_DAYS`). Replacing one is the point, but only a CRL of this CA is
        replaced: any other existing file at ``path`` is `OutputExists`.

        If the PKI directory cannot be written (read-only media), a CRL to a path elsewhere is
        still written, its number not recorded in ``crlnumber`` (see `_crl_for`); the PKI's own
        ``crl.pem`` is then `ReadOnlyPki`."""
        path = path or self.crl_path
        own = os.path.abspath(path) == os.path.abspath(self.crl_path)  # however it is spelled
        if own or lock.writable(self.directory):
            with self._locked("write crl.pem"):
                replace_file(path, self._crl_for(path, days, None))
            return path
        with lock.shared(self.directory):  # a writer on another, writable mount waits
            pem = self._crl_for(path, days, None, record_number=False)
        replace_file(path, pem)
        return path

    def _crl_for(
        self,
        path: Path,
        days: float | None,
        records: Sequence[CertRecord] | None,
        *,
        record_number: bool = True,
    ) -> bytes:
        """The PEM CRL to write at ``path`` (see `write_crl`) of ``records`` (None: the
        index's), numbered above every CRL number recorded and every CRL of this CA at ``path``
        and in ``crl.pem``.

        Its number is recorded in ``crlnumber`` before it is returned, or, with
        ``record_number`` False (the directory is read-only), it is the clock's second (the
        recorded numbers, if they run ahead of the clock, are waited out, up to
        `MAX_UNRECORDED_LEAD`, else `PkiError`) and this returns only once the clock has passed
        it: every later CRL, numbered at least by its own second, is numbered above it as long
        as the CA's clock does not go back. A recorded number needs no such trust."""
        existing = self._our_crl(path)
        # The PKI's own crl.pem is always ours to replace (even damaged: revoking must work);
        # a file elsewhere only if it is a CRL of this CA (`--out ca.key` must not destroy it).
        if existing is None and path != self.crl_path and path.exists():
            raise OutputExists(path)
        own = existing if path == self.crl_path else self._our_crl(self.crl_path)
        if days is None:
            # A periodic `crl` or a `revoke` must not shorten a 30-day CRL to the default 7.
            replaced = existing or own
            days = (
                (replaced.next_update_utc - replaced.last_update_utc - _CRL_BACKDATE)
                / dt.timedelta(days=1)
                if replaced is not None and replaced.next_update_utc is not None
                else DEFAULT_CRL_DAYS
            )
        ours = [crl for crl in (existing, own) if crl is not None]
        numbers = [crl_number(crl) or 0 for crl in ours]
        records = self.records() if records is None else records
        # A serial this CA's CRL lists stays listed even if the index does not say revoked (a
        # revoke whose index could not be saved): a CRL never takes a revocation back.
        indexed = {r.serial for r in records if r.revoked_at is not None}
        carried = {
            entry.serial_number: entry.revocation_date_utc
            for crl in ours
            for entry in crl
            if entry.serial_number not in indexed
        }
        # Numbers run ahead of the clock when CRLs come faster than one a second: one written
        # with --out may be ahead of crl.pem, and a verifier holding it would refuse the next
        # crl.pem (a revocation, say) as a rollback. Every CRL is numbered above all before it.
        after = max([*numbers, self._last_crl_number()])
        now = _now()
        if not record_number:
            now = self._clock_past(after, now)
        crl = self.build_crl(days=days, now=now, after=after, records=records, also_revoked=carried)
        number = crl_number(crl) or after + 1
        if record_number:
            # Recorded before the CRL is written: a number skipped is harmless, one reused is not.
            replace_file(self.crl_number_path, f"{number}\n".encode())
        else:
            _wait_until(number + 1)  # no later CRL can be numbered ``number`` or below
        return crl.public_bytes(serialization.Encoding.PEM)

    def _clock_past(self, after: int, now: dt.datetime) -> dt.datetime:
        """A time whose second is above ``after``, the highest CRL number known: ``now``, or
        a little later, waited for."""
        lead = after + 1 - int(now.timestamp())
        if lead > MAX_UNRECORDED_LEAD:
            raise PkiError(
                f"CRL number {after} (recorded in {self.directory}) is {lead} s ahead of the"
                " clock; a CRL whose number cannot be recorded is numbered by the clock: check"
                " the clock, or write it with the PKI directory writable"
            )
        if lead > 0:
            _wait_until(after + 1)
        return _now()

    def _last_crl_number(self) -> int:
        """The highest CRL number this PKI issued (0 if unknown: missing or unreadable)."""
        try:
            return int(self.crl_number_path.read_text().strip())
        except (OSError, ValueError):
            return 0

    def _crl_serials(self) -> set[int]:
        """The serials the PKI's own ``crl.pem`` lists (none if it is missing or not ours)."""
        crl = self._our_crl(self.crl_path)
        return set() if crl is None else {entry.serial_number for entry in crl}
