"""Topic levels a consumer would resolve as a path step (RELIABILITY F18), for both wings.

MQTT resolves no paths, but the platform's consumers may: a topic turned into a file path, an
object key or a URL. A level ``.`` or ``..`` would then climb out of a device's prefix
(``devices/me/../other/x``). So is a level that becomes one on the way: Unicode compatibility
normalisation (NFKC, which many path and key handlers apply: U+2025 two dot leader, U+FF0E
fullwidth full stop), ``\\`` read as a separator (Windows paths), percent-decoding (URLs:
``%2e%2e``). The sink refuses such a publish as a rights violation; the agent refuses such an
event at the door (the sink would close the link on it, time after time).
"""

from __future__ import annotations

import unicodedata
import urllib.parse

__all__ = ["dot_level"]

_DOT_LEVELS = frozenset((".", ".."))


def dot_level(topic: str) -> bool:
    """Whether ``topic`` (or a part of one) has a level that is, or becomes, ``.`` or ``..``."""
    if topic.isascii() and "%" not in topic and "\\" not in topic:  # the usual case: one split
        return not _DOT_LEVELS.isdisjoint(topic.split("/"))
    forms = {topic}
    if "%" in topic:
        forms.add(urllib.parse.unquote(topic, errors="surrogateescape"))
    forms |= {unicodedata.normalize("NFKC", form) for form in forms if not form.isascii()}
    return any(not _DOT_LEVELS.isdisjoint(form.replace("\\", "/").split("/")) for form in forms)
