"""Writing an issued certificate and its key so that a run killed part way can be retried.

A key and its certificate are two files, and no filesystem writes two at once. The order makes
every crash point recoverable without guessing whose files are whose:

1. the record, ``issuance: started``, in ``index.json`` (a certificate the index does not know
   could never be revoked);
2. the key at a pending name next to its own, ``.NAME.key.pending`` (mode 0600);
3. the certificate at its name;
4. the key linked to its name (never over an existing file), the pending name removed;
5. the record marked ``complete``.

So a key is at its name only once its certificate is in place, and the whole sequence runs under
the PKI directory's lock. The next issuance, under that lock, settles every ``started`` record
(`settle`): none can belong to a run still going. If the certificate and its key are both in
place (a kill after step 4) the record is marked ``complete``; otherwise the key never reached
its name and nobody can hold it, so the pending key and the certificate (only if it is the one
of that record: its serial, signed by this CA) are removed and the record is marked
``abandoned``, kept so its serial stays known. Nothing else is ever touched: a file at a key's
name, or a certificate with another serial, is left alone (and refuses the issuance as before).

A run killed inside step 2 (`write_new`: a temporary file, linked to the pending name, then
removed) leaves that temporary file, a copy of the key (mode 0600): the pending key's second
name, or its only copy if the kill came before the link. Settling a record removes those of its
pending key too (``..NAME.key.pending.XXXXXXXX.tmp``, `stray_temporaries`). None can be needed:
the certificate is written only once that write has returned, its temporary file gone, so no
certificate of that key exists, and its record is settled ``abandoned``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from certs.errors import KeyUnreadable, OutputExists
from certs.files import write_new
from certs.index import CertRecord
from certs.keys import load_private_key
from mqtt_ingest import failpoints
from mqtt_ingest.disk import fsync_directory, temporaries

__all__ = ["discard", "pending_key_path", "settle", "stray_temporaries", "write_pair"]


def pending_key_path(key_path: Path) -> Path:
    """Where a key waits for its certificate (a dot name: no glob of ``*.key`` picks it up)."""
    return key_path.with_name(f".{key_path.name}.pending")


def stray_temporaries(key_path: Path) -> list[Path]:
    """The temporary files a killed write of ``key_path``'s pending key left (see above)."""
    return temporaries(pending_key_path(key_path), mode=0o600)


def write_pair(cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes) -> None:
    """Steps 2 to 4 above. `OutputExists` if any of the three names is taken; on an error the
    caller calls `discard`."""
    pending = pending_key_path(key_path)
    write_new(pending, key_pem, 0o600)
    failpoints.hit("certs.issue.after_key")
    write_new(cert_path, cert_pem, 0o644)
    failpoints.hit("certs.issue.after_cert")
    try:
        os.link(pending, key_path)
    except FileExistsError:
        raise OutputExists(key_path) from None
    failpoints.hit("certs.issue.after_link")
    pending.unlink()
    fsync_directory(key_path.parent)


def _holds(cert_path: Path, serial: int, issuer: x509.Certificate) -> x509.Certificate | None:
    """The certificate at ``cert_path`` if it is ``serial`` signed by ``issuer``: one this CA
    wrote for that record, since no one else holds its key."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(issuer)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return None
    return cert if cert.serial_number == serial else None


def discard(cert_path: Path, key_path: Path, serial: int, issuer: x509.Certificate) -> bool:
    """Undo what `write_pair` for ``serial`` left short of step 4: its pending key, and its
    certificate. Whether that certificate had been written (its record must then stay)."""
    cert = _holds(cert_path, serial, issuer)
    if cert is not None:
        cert_path.unlink()
        fsync_directory(cert_path.parent)
    pending = pending_key_path(key_path)
    if pending.exists():
        pending.unlink()
        fsync_directory(pending.parent)
    return cert is not None


def _matches(cert: x509.Certificate, key_path: Path) -> bool | None:
    """Whether the key at ``key_path`` is ``cert``'s (None: it cannot be read, so unknown)."""
    try:
        return load_private_key(key_path).public_key() == cert.public_key()
    except KeyUnreadable:
        return None


def settle(
    directory: Path, records: Sequence[CertRecord], issuer: x509.Certificate
) -> tuple[list[CertRecord], list[Path]]:
    """The records with every ``started`` one settled (see above), its leftover files removed,
    and the stray temporary key files removed with them. A record whose key path is unknown, or
    whose certificate is in place next to a key that cannot be read now, is left as it is."""
    settled: list[CertRecord] = []
    removed: list[Path] = []
    for record in records:
        key_path = record.key_file(directory)
        if record.issuance != "started" or key_path is None:
            settled.append(record)
            continue
        cert_path = record.cert_file(directory)
        cert = _holds(cert_path, record.serial, issuer)
        matches = _matches(cert, key_path) if cert is not None and key_path.exists() else False
        if matches is None:
            settled.append(record)
            continue
        strays = stray_temporaries(key_path)
        for stray in strays:
            stray.unlink()
        if strays:
            fsync_directory(key_path.parent)
        removed += strays
        if matches:
            pending = pending_key_path(key_path)
            if pending.exists():  # killed between link and unlink: the same file twice
                pending.unlink()
                fsync_directory(pending.parent)
            settled.append(dataclasses.replace(record, issuance="complete"))
        else:  # the key never reached its name (whatever is there now is not ours)
            discard(cert_path, key_path, record.serial, issuer)
            settled.append(dataclasses.replace(record, issuance="abandoned"))
    return settled, removed
