"""Topic rights on the sink (SPEC §3, §7; RELIABILITY F18).

A device may publish only under its own prefix (``devices/{device_id}/`` by default) and may not
subscribe at all. ``devices/me`` alone is refused. MQTT resolves no paths, but the platform's
consumers may (a topic turned into a file path, an object key, a URL): a topic level ``.`` or
``..`` is refused too, so ``devices/me/../other/x`` cannot reach another device's data anywhere
downstream (RELIABILITY F18); and so is a level that becomes one on the way there (NFKC,
a backslash as a separator, percent-decoding: `mqtt_ingest.topics.dot_level`).
"""

from __future__ import annotations

import string

from mqtt_ingest import Action, Identity
from mqtt_ingest.topics import dot_level

__all__ = ["DevicePrefixRights", "check_template"]


def check_template(template: str) -> str:
    """Return ``template`` if it is a usable prefix template, else raise ValueError saying why.

    ``{device_id}`` exactly once, as a whole topic level, and the template ends with ``/``: a
    device id has no ``/``, so no device's prefix can contain another's. No other field (it would
    fail on every publish), no wildcard, no NUL.
    """
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]
    except ValueError as exc:
        raise ValueError(f"the prefix template {template!r} is malformed: {exc}") from None
    names = [name for name, _, _ in fields if name is not None]
    if names != ["device_id"] or any(spec or conv for name, spec, conv in fields if name):
        raise ValueError(
            f"the prefix template {template!r} must contain {{device_id}} once and no other field"
        )
    levels = template.split("/")
    if "{device_id}" not in levels or not template.endswith("/"):
        raise ValueError(
            f"the prefix template {template!r} must have {{device_id}} as a whole topic level"
            " and end with '/' (e.g. 'devices/{device_id}/')"
        )
    if any(c in template for c in "+#\x00"):
        raise ValueError(f"the prefix template {template!r} cannot contain '+', '#' or NUL")
    return template


class DevicePrefixRights:
    def __init__(self, template: str = "devices/{device_id}/") -> None:
        self.template = check_template(template)

    def prefix(self, device_id: str) -> str:
        return self.template.format(device_id=device_id)

    def allowed(self, identity: Identity, topic: str, action: Action) -> bool:
        if action is not Action.PUBLISH:
            return False
        prefix = self.prefix(identity.name)
        if not topic.startswith(prefix) or len(topic) == len(prefix):
            return False
        return not dot_level(topic[len(prefix) :])
