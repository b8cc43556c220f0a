"""The PKI's ``index.json``: every certificate issued (serial, kind, name, validity, revocation,
where its files went, whether its issuance finished), read without the CA key (``bridge-certs
list``).

Paths are stored relative to the PKI directory when they are inside it, absolute otherwise, so
they mean the same whatever directory a later command runs in. Records written before that
(no ``relative_to``) stored a path as it was given, relative to the directory the issuing
command ran in: one ending in the tool's own layout (``devices/ID.pem``, ``servers/NAME.pem``,
``ca.pem``) is read as that file of the PKI directory if that file is the record's certificate
(its serial: ``--cert out/devices/ID.pem`` made such a path elsewhere); any other relative path
is kept as given, marked ``issuer-cwd`` (its base is unknown).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any, Literal

from cryptography import x509

from certs.errors import PkiError

__all__ = [
    "CertKind",
    "CertRecord",
    "Issuance",
    "index_bytes",
    "new_record",
    "read_index",
    "stored_path",
]

CertKind = Literal["ca", "server", "device"]
Issuance = Literal["started", "complete", "abandoned"]
"""``started``: recorded, its files being written (or the run was killed: the next issuance
settles it); ``complete``: certificate and key at their names; ``abandoned``: a killed run's
leftovers removed, the key never reached its name."""
RelativeTo = Literal["pki", "issuer-cwd"]


@dataclass(frozen=True)
class CertRecord:
    """One line of ``index.json``."""

    serial: int
    kind: CertKind
    name: str
    not_before: str  # ISO 8601, UTC
    not_after: str
    cert_path: str
    revoked_at: str | None = None
    key_path: str | None = None  # None: recorded before key paths were
    issuance: Issuance = "complete"  # records before this field were complete or unknowable
    relative_to: RelativeTo = "pki"

    def status(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.issuance == "started":
            return "interrupted"
        if self.issuance == "abandoned":
            return "abandoned"
        if now < dt.datetime.fromisoformat(self.not_before):
            return "not-yet-valid"
        if now > dt.datetime.fromisoformat(self.not_after):
            return "expired"
        return "valid"

    def cert_file(self, directory: Path) -> Path:
        """The certificate's path as seen from here, for the PKI directory ``directory``."""
        return self._file(directory, self.cert_path)

    def key_file(self, directory: Path) -> Path | None:
        return None if self.key_path is None else self._file(directory, self.key_path)

    def _file(self, directory: Path, stored: str) -> Path:
        # An absolute path stays absolute under `/`; an issuer-cwd one has no better base.
        return Path(directory) / stored if self.relative_to == "pki" else Path(stored)


def stored_path(directory: Path, path: Path) -> str:
    """``path`` as the index keeps it: relative to ``directory`` if inside it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(directory)).as_posix()
    except ValueError:
        return str(absolute)


def _default_tail(kind: str, name: str) -> PurePath:
    return {
        "ca": PurePath("ca.pem"),
        "server": PurePath("servers", f"{name}.pem"),
        "device": PurePath("devices", f"{name}.pem"),
    }.get(kind, PurePath())


def _from_old(directory: Path, item: dict[str, Any]) -> dict[str, Any]:
    """A record written before paths were stored relative to the PKI directory (see above)."""
    path = PurePath(item["cert_path"])
    if path.is_absolute():
        return {**item, "cert_path": stored_path(directory, Path(path)), "relative_to": "pki"}
    tail = _default_tail(item["kind"], item["name"])
    if (
        tail.parts
        and path.parts[-len(tail.parts) :] == tail.parts
        and _holds_serial(Path(directory) / tail, item["serial"])
    ):
        return {**item, "cert_path": tail.as_posix(), "relative_to": "pki"}
    return {**item, "relative_to": "issuer-cwd"}


def _holds_serial(path: Path, serial: int) -> bool:
    """Whether ``path`` is the certificate ``serial``: an old path in the tool's layout may also
    have been given with ``--cert`` elsewhere (``out/devices/ID.pem``), and mapped to the PKI
    directory's file it named one that does not exist, or another certificate."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number == serial
    except (OSError, ValueError):
        return False


def read_index(directory: Path) -> list[CertRecord]:
    """The records of ``directory``'s ``index.json`` (none if it is missing), read without the CA
    key: listing what was issued needs no private key. `PkiError` if the index is damaged."""
    path = Path(directory) / "index.json"
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        items = [{**item, "serial": int(item["serial"])} for item in raw]
        return [
            CertRecord(**(item if "relative_to" in item else _from_old(directory, item)))
            for item in items
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise PkiError(f"{path} is damaged: {exc}") from exc


def new_record(
    cert: x509.Certificate,
    kind: CertKind,
    name: str,
    *,
    directory: Path,
    cert_path: Path,
    key_path: Path,
    issuance: Issuance,
) -> CertRecord:
    return CertRecord(
        serial=cert.serial_number,
        kind=kind,
        name=name,
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        cert_path=stored_path(directory, cert_path),
        key_path=stored_path(directory, key_path),
        issuance=issuance,
    )


def index_bytes(records: list[CertRecord]) -> bytes:
    """``index.json``'s content for ``records``."""
    # Serials are 159-bit integers: kept as strings so no JSON reader rounds them.
    payload = [{**asdict(r), "serial": str(r.serial)} for r in records]
    return (json.dumps(payload, indent=2) + "\n").encode()
