"""Topic names both wings accept: valid MQTT names with no empty level (`topic_problem`), and no
level a consumer would resolve as a path step (RELIABILITY F18).

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

__all__ = ["MAX_TOPIC_BYTES", "dot_level", "topic_problem"]

MAX_TOPIC_BYTES = 65535

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


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` is not a topic name both wings take (a valid MQTT name, no empty level, no
    path-step level), or None."""
    if not topic:
        return "the topic is empty"
    if "+" in topic or "#" in topic:
        return "a topic name cannot contain the wildcards '+' or '#'"
    if "\x00" in topic:
        return "a topic name cannot contain NUL"
    size = len(topic.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        return f"the topic is {size} bytes, over MQTT's {MAX_TOPIC_BYTES}"
    levels = topic.split("/")
    if "" in levels:
        return "the topic has an empty level ('//', or '/' at either end)"
    if dot_level(topic):
        # A consumer that maps topics to paths would climb out of the device's prefix; our sink
        # refuses such a publish as a rights violation (the link would fail on it for ever).
        return (
            "a topic level cannot be '.' or '..', nor become one (Unicode NFKC, '\\' as a"
            " separator, percent-decoding)"
        )
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return "the topic is not valid UTF-8"
    return None
