"""The PKI tool's errors: each says what the operator must fix."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CaMissing", "KeyUnreadable", "OutputExists", "PkiError"]


class PkiError(Exception):
    """Anything the operator must fix before the PKI tool can do what was asked."""


class OutputExists(PkiError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} exists already; refusing to overwrite it")
        self.path = path


class CaMissing(PkiError):
    def __init__(self, directory: Path) -> None:
        super().__init__(f"no CA in {directory} (ca.pem and ca.key); run 'bridge-certs init-ca'")
        self.directory = directory


class KeyUnreadable(PkiError):
    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cannot read private key {path}: {why}")
        self.path = path
