"""A device's identity in its certificate: the subject CN, or its ``urn:device:`` SAN URI
(SPEC §6, ``[auth] identity``). Read by the sink at CONNECT and by the agent's `doctor`."""

from __future__ import annotations

from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["URI_PREFIX", "certificate_identities", "cn_identity", "san_uri_identity"]

URI_PREFIX = "urn:device:"


def cn_identity(certificate: x509.Certificate) -> str:
    """The subject CN, or "" unless there is exactly one (with several, tools disagree on which
    one names the subject)."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else ""


def san_uri_identity(certificate: x509.Certificate) -> str:
    """The device id of the one ``urn:device:`` SAN URI (percent-encoded UTF-8, as bridge-certs'
    device_uri writes it), or "" unless there is exactly one that decodes."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError):  # none; or extensions that do not parse
        return ""
    found = [u.removeprefix(URI_PREFIX) for u in uris if u.startswith(URI_PREFIX)]
    try:
        return unquote(found[0], errors="strict") if len(found) == 1 else ""
    except UnicodeDecodeError:
        return ""


def certificate_identities(certificate: x509.Certificate) -> set[str]:
    """The device ids ``certificate`` names (by CN, by SAN URI): what a sink could take it for."""
    return {cn_identity(certificate), san_uri_identity(certificate)} - {""}
