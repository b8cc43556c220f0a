"""Core-queue backends of the sink (SPEC §3): where an event is delivered before it is acked."""

from cloud_sink.backends.base import (
    BackendError,
    CoreMessage,
    CoreQueue,
    DeadLetterMessage,
    PublishOutcome,
)
from cloud_sink.backends.sqlite import SqliteCoreQueue, read_dead_letters, read_messages

__all__ = [
    "BackendError",
    "CoreMessage",
    "CoreQueue",
    "DeadLetterMessage",
    "PublishOutcome",
    "SqliteCoreQueue",
    "read_dead_letters",
    "read_messages",
]
