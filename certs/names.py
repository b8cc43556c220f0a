"""Names in certificates: a device's SAN URI, common names, DNS names, serial numbers."""

from __future__ import annotations

import ipaddress
from urllib.parse import quote

import idna
from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.errors import PkiError

__all__ = [
    "DEVICE_URI_PREFIX",
    "MAX_COMMON_NAME",
    "device_uri",
    "dns_name",
    "format_serial",
    "parse_serial",
    "subject_name",
]

DEVICE_URI_PREFIX = "urn:device:"
MAX_COMMON_NAME = 64  # characters: RFC 5280's ub-common-name


def device_uri(device_id: str) -> str:
    """``urn:device:<id>``, the id percent-encoded as UTF-8 where a URI needs it (a SAN URI is
    ASCII: an id like ``gerät-1`` could not be issued); the sink decodes it."""
    return DEVICE_URI_PREFIX + quote(device_id, safe="-_~!$&'()=:@,;")


def subject_name(value: str, what: str) -> x509.Name:
    if not value:
        raise PkiError(f"{what} cannot be empty")
    if len(value) > MAX_COMMON_NAME:
        raise PkiError(
            f"{what} of {len(value)} characters does not fit a certificate's common name"
            f" ({MAX_COMMON_NAME} at most, RFC 5280)"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def dns_name(text: str) -> str:
    """``text`` as a DNS name for a certificate (IDNA A-labels); `PkiError` if it is none.

    One trailing dot (the fully qualified spelling) is dropped: a SAN ``host.example.`` matches
    no client connecting to ``host.example``. An IP address is refused: as a DNS SAN it matches
    no connection to that address, which needs an IP SAN (``--ip``).
    """
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    name = name.removesuffix(".")
    if not name or name.endswith(".") or any(c in name for c in "/ \x00*"):
        raise PkiError(f"{text!r} is not a DNS name")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise PkiError(f"{text!r} is an IP address, not a DNS name: pass it with --ip")
    try:
        ascii_name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise PkiError(f"{text!r} is not a DNS name: {exc}") from None
    if len(ascii_name) > 253:
        raise PkiError(f"{text!r} is longer than a DNS name can be (253 characters)")
    return ("*." if wildcard else "") + ascii_name


def parse_serial(text: str) -> int | None:
    """A serial as `list` prints it: hex, optionally ``0x``-prefixed or colon-separated."""
    cleaned = text.lower().removeprefix("0x").replace(":", "")
    try:
        return int(cleaned, 16) if cleaned else None
    except ValueError:
        return None


def format_serial(serial: int) -> str:
    return f"0x{serial:x}"
