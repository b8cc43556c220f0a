"""The PKI's ``index.json``: every certificate issued (serial, kind, name, validity, revocation),
read without the CA key (``bridge-certs list``)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from certs.errors import PkiError

__all__ = ["CertKind", "CertRecord", "index_bytes", "new_record", "read_index"]

CertKind = Literal["ca", "server", "device"]


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

    def status(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now < dt.datetime.fromisoformat(self.not_before):
            return "not-yet-valid"
        if now > dt.datetime.fromisoformat(self.not_after):
            return "expired"
        return "valid"


def read_index(directory: Path) -> list[CertRecord]:
    """The records of ``directory``'s ``index.json`` (none if it is missing), read without the CA
    key: listing what was issued needs no private key. `PkiError` if the index is damaged."""
    path = Path(directory) / "index.json"
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        return [CertRecord(**{**item, "serial": int(item["serial"])}) for item in raw]
    except (ValueError, KeyError, TypeError) as exc:
        raise PkiError(f"{path} is damaged: {exc}") from exc


def new_record(cert: x509.Certificate, kind: CertKind, name: str, path: Path) -> CertRecord:
    return CertRecord(
        serial=cert.serial_number,
        kind=kind,
        name=name,
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        cert_path=str(path),
    )


def index_bytes(records: list[CertRecord]) -> bytes:
    """``index.json``'s content for ``records``."""
    # Serials are 159-bit integers: kept as strings so no JSON reader rounds them.
    payload = [{**asdict(r), "serial": str(r.serial)} for r in records]
    return (json.dumps(payload, indent=2) + "\n").encode()
