"""What makes an existing JetStream stream unfit for the sink's core queue, or able to lose what
the sink confirmed: checked when the sink starts and at every probe (`NatsCoreQueue`)."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, PersistMode, RetentionPolicy, StorageType, StreamConfig

from cloud_sink.backends.base import BackendError

__all__ = ["check_stream", "removals", "subject_covers"]


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject matched by `subject` (which may hold wildcards) is matched by
    `pattern`."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return i < len(s_tokens)
        if i >= len(s_tokens):
            return False
        s = s_tokens[i]
        if s == ">":
            return False  # pattern is narrower than a tail wildcard
        if p != "*" and p != s:
            return False
    return len(p_tokens) == len(s_tokens)


def check_stream(
    name: str, config: StreamConfig, wanted: str, duplicate_window: float, storage: StorageType
) -> None:
    """`BackendError` saying what to fix if stream ``name`` (``config``) cannot take the
    subjects ``wanted`` with the sink's guarantees: confirmed means stored for good, once."""
    subjects: list[str] = list(config.subjects or [])
    if not any(subject_covers(s, wanted) for s in subjects):
        raise BackendError(
            f"JetStream stream {name!r} exists with subjects {subjects}, which do not cover"
            f" {wanted!r}: fix the stream or the configured subject prefix"
        )
    window = float(config.duplicate_window or 0)
    if window + 1e-3 < duplicate_window:
        raise BackendError(
            f"JetStream stream {name!r} has a duplicate window of {window:g}s, less than"
            f" the configured {duplicate_window:g}s: resends would be stored twice"
        )
    if storage == StorageType.FILE and config.storage == StorageType.MEMORY:
        raise BackendError(
            f"JetStream stream {name!r} keeps its messages in memory: a NATS restart would"
            " lose events the sink confirmed to devices (which deleted them); recreate it"
            " with file storage"
        )
    if storage == StorageType.FILE and config.persist_mode == PersistMode.ASYNC:
        raise BackendError(
            f"JetStream stream {name!r} has persist_mode async: its PubAck comes before the"
            " message is on disk, so a NATS crash would lose events the sink confirmed to"
            " devices (which deleted them); recreate it without persist_mode async"
        )
    # Either one failed every publish while the checks above (and so every probe) passed:
    # the sink went down and up again for ever.
    if config.no_ack:
        raise BackendError(
            f"JetStream stream {name!r} is no_ack: it sends no PubAck, so nothing"
            " published to it can be confirmed; recreate it without no_ack"
        )
    if config.sealed:
        raise BackendError(
            f"JetStream stream {name!r} is sealed: it refuses every message; point the sink"
            " at another stream"
        )


def removals(config: StreamConfig) -> list[str]:
    """How the stream removes messages whether a consumer read them or not (empty: never).

    These are the platform's retention choices, not errors, but each can remove an event the
    sink confirmed to its device (which then deleted it) before anything read it. With
    ``discard: new`` a full stream refuses new messages instead: the sink stops confirming and
    the gateways keep buffering, nothing is lost. ``max_age`` removes messages whatever the
    discard policy."""
    found = []
    discard_old = config.discard != DiscardPolicy.NEW
    for field in ("max_msgs", "max_bytes"):
        value = getattr(config, field)
        if discard_old and value is not None and value > 0:
            found.append(f"{field} {value} with discard old")
    per_subject = config.max_msgs_per_subject
    if (
        per_subject is not None
        and per_subject > 0
        and not (config.discard == DiscardPolicy.NEW and config.discard_new_per_subject)
    ):
        found.append(f"max_msgs_per_subject {per_subject} (the oldest of a subject go)")
    if config.max_age is not None and config.max_age > 0:
        found.append(f"max_age {config.max_age:g}s")
    if config.retention == RetentionPolicy.INTEREST:
        found.append("retention interest (what no consumer is interested in goes at once)")
    return found
