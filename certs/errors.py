"""The PKI tool's errors: each says what the operator must fix."""

from __future__ import annotations

from pathlib import Path

from mqtt_ingest.disk import temporaries

__all__ = ["CaMissing", "KeyUnreadable", "OutputExists", "PkiError", "ReadOnlyPki"]


class PkiError(Exception):
    """Anything the operator must fix before the PKI tool can do what was asked."""


class OutputExists(PkiError):
    def __init__(self, path: Path, why: str = "") -> None:
        super().__init__(f"{path} exists already{why}; refusing to overwrite it")
        self.path = path


class CaMissing(PkiError):
    def __init__(self, directory: Path) -> None:
        cert, key = directory / "ca.pem", directory / "ca.key"
        if key.exists() and not cert.exists() and not (directory / "index.json").exists():
            # Left by an init-ca that did not finish: its retry refused the directory too.
            message = interrupted_init(key)
        else:
            message = f"no CA in {directory} (ca.pem and ca.key); run 'bridge-certs init-ca'"
        super().__init__(message)
        self.directory = directory


def interrupted_init(key: Path) -> str:
    """What to do about a CA key alone, naming the copy of it a write killed after its link
    left (a temporary file, `certs.files.write_new`)."""
    copies = temporaries(key, mode=0o600)
    also = "".join(f" and {copy}" for copy in copies)
    what = f"it{also} (a copy of it the killed write left)" if copies else "it"
    return (
        f"{key} is there without ca.pem or index.json: an init-ca that did not finish? No"
        f" certificate can have been issued with it (never removed for you: a CA key). Delete"
        f" {what}, then run 'bridge-certs init-ca' again"
    )


class KeyUnreadable(PkiError):
    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cannot read private key {path}: {why}")
        self.path = path


class ReadOnlyPki(PkiError):
    """The PKI directory cannot be written (read-only media, or no write permission): the
    command changes it (issue, revoke, the PKI's own crl.pem). ``list`` and ``crl --out FILE``
    do not, and work on it as it is. With ``missing``, the directory does not exist and cannot
    be created there (an init-ca on read-only media)."""

    def __init__(self, directory: Path, action: str, why: str, *, missing: bool = False) -> None:
        state = "does not exist and cannot be created" if missing else "is not writable"
        tail = "" if missing else "; only 'list' and 'crl --out FILE' work on it as it is"
        super().__init__(f"cannot {action}: the PKI directory {directory} {state} ({why}){tail}")
        self.directory = directory
