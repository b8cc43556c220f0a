"""The bridge's small PKI (SPEC §8), usable as a library and as ``bridge-certs``."""

from certs.pki import (
    CaMissing,
    CertificateAuthority,
    CertRecord,
    ExistsAfterSettling,
    Issued,
    KeyType,
    KeyUnreadable,
    OutputExists,
    PkiError,
    ReadOnlyPki,
    device_uri,
    format_serial,
    generate_key,
    load_private_key,
)

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
]
