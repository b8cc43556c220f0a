"""Topic rights on the sink (SPEC §3, §7; RELIABILITY F18).

A device may publish only under its own prefix (``devices/{device_id}/`` by default) and may not
subscribe at all. The check is on the raw topic string, so ``devices/me/../other`` is simply a
topic under ``devices/me/`` (MQTT has no path resolution) and ``devices/me`` alone is refused.
"""

from __future__ import annotations

from mqtt_ingest import Action, Identity

__all__ = ["DevicePrefixRights"]


class DevicePrefixRights:
    def __init__(self, template: str = "devices/{device_id}/") -> None:
        if "{device_id}" not in template or not template.endswith("/"):
            raise ValueError("the prefix template must contain {device_id} and end with '/'")
        self.template = template

    def prefix(self, device_id: str) -> str:
        return self.template.format(device_id=device_id)

    def allowed(self, identity: Identity, topic: str, action: Action) -> bool:
        if action is not Action.PUBLISH:
            return False
        prefix = self.prefix(identity.name)
        return topic.startswith(prefix) and len(topic) > len(prefix)
