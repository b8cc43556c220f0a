"""Device identifiers: validated once, here, for every part that names a device.

A device id becomes an MQTT topic level (``devices/{id}/...``), a NATS subject token, an AMQP
routing-key word, a certificate CN and a file name. Anything that would change the meaning of one
of those is refused rather than escaped: ``/``, ``+`` and ``#`` (MQTT topic syntax; Mosquitto's
``security_default.c`` refuses them in identities for the same reason), ``.``, ``*`` and ``>`` (NATS
and AMQP routing syntax), ``?`` (it starts the connection parameters in the MQTT user name), NUL,
other control characters, white space and characters that do not show (zero width, bidirectional
overrides: an id holding one reads like another).

An id is also refused when it becomes something else on its way to a consumer that normalises
topics as `mqtt_ingest.topics` expects some to (file paths, object keys, URLs): one not in
Unicode NFKC form (two U+FF0E fullwidth full stops are ``..`` there, ``a`` U+FF0F ``b`` is
``a/b``, and a decomposed ``é`` reads like the composed one in a log or a deny list), one with a
percent-escape (``%2E%2E``, ``a%2Fb``) or a ``\\`` (a path separator on Windows). The rights
check refuses such levels after a device's prefix; in the id they were the prefix itself:
``devices/%2E%2E/devices/victim/t`` is ``devices/victim/t`` for such a consumer.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse

__all__ = ["MAX_DEVICE_ID_BYTES", "InvalidIdentifier", "validate_device_id"]

MAX_DEVICE_ID_BYTES = 128

_FORBIDDEN = {
    "/": "'/' is the MQTT topic level separator",
    "+": "'+' is an MQTT wildcard",
    "#": "'#' is an MQTT wildcard",
    ".": "'.' is the NATS subject and AMQP routing-key separator",
    "*": "'*' is a NATS and AMQP wildcard",
    ">": "'>' is a NATS wildcard",
    "\x00": "NUL is not allowed in MQTT strings",
    "?": "'?' starts the connection parameters in the MQTT user name",
}
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
_INVISIBLE = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp", "Zs"})
"""Unicode categories of characters that do not show, or show as something else: format (zero
width, bidirectional overrides), private use, unassigned, separators. An id holding one reads
like another id in a log or a deny list."""


class InvalidIdentifier(ValueError):
    """A device id that cannot be used safely; ``reason`` says why."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid device id {value!r}: {reason}")
        self.value = value
        self.reason = reason


def validate_device_id(value: str, *, normal: bool = True) -> str:
    """Return ``value`` unchanged if it is a usable device id, else raise `InvalidIdentifier`.

    ``normal=False`` leaves out the checks for what a normalising consumer reads as another id
    (NFKC, percent-escapes, ``\\``): a deny list keeps such ids it named before they were
    refused (the id an operator denies after seeing the attack), instead of failing the sink's
    start after an upgrade; no certificate naming one connects any more anyway."""
    if not value:
        raise InvalidIdentifier(value, "it is empty")
    for char, why in _FORBIDDEN.items():
        if char in value:
            raise InvalidIdentifier(value, why)
    if _CONTROL_OR_SPACE.search(value):
        raise InvalidIdentifier(value, "control characters and white space are not allowed")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidIdentifier(value, "it is not valid UTF-8 (lone surrogate)") from exc
    if size > MAX_DEVICE_ID_BYTES:
        raise InvalidIdentifier(value, f"{size} bytes is over the limit of {MAX_DEVICE_ID_BYTES}")
    hidden = next((c for c in value if unicodedata.category(c) in _INVISIBLE), None)
    if hidden is not None:
        raise InvalidIdentifier(
            value, f"invisible or formatting character U+{ord(hidden):04X} is not allowed"
        )
    if not normal:
        return value
    if "\\" in value:
        raise InvalidIdentifier(value, "'\\' is a path separator for some consumers")
    if not value.isascii():
        normalized = unicodedata.normalize("NFKC", value)
        if normalized != value:
            raise InvalidIdentifier(
                value, f"it is not in Unicode NFKC form (it reads as, or becomes, {normalized!r})"
            )
    if "%" in value and urllib.parse.unquote(value) != value:
        raise InvalidIdentifier(value, "a percent-escape becomes another character when decoded")
    return value
