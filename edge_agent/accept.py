"""The one acceptance path every source goes through (listener, CLI, Python API).

An event is checked at the door, once (STYLE 13): its topic must be a valid MQTT topic name with
no empty level, and its payload within its topic rule's ``max_payload``. Nothing invalid is stored;
the caller gets `InvalidEvent` saying what and why. The topic's rule then decides the uplink QoS,
priority, TTL and what happens when the buffer is full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edge_agent.buffer import Buffer, BufferFull, NewEvent
from edge_agent.config import AgentConfig, TopicRule
from mqtt_ingest.clock import Clock

__all__ = ["Acceptor", "InvalidEvent", "check_event", "topic_problem"]

MAX_TOPIC_BYTES = 65535


class InvalidEvent(ValueError):
    """An event refused at the door; nothing was stored."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"refused event on {topic[:200]!r}: {reason}")
        self.topic = topic
        self.reason = reason


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be buffered, or None."""
    if not topic:
        return "the topic is empty"
    if "+" in topic or "#" in topic:
        return "a topic name cannot contain the wildcards '+' or '#'"
    if "\x00" in topic:
        return "a topic name cannot contain NUL"
    size = len(topic.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        return f"the topic is {size} bytes, over MQTT's {MAX_TOPIC_BYTES}"
    if "" in topic.split("/"):
        return "the topic has an empty level ('//', or '/' at either end)"
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return "the topic is not valid UTF-8"
    return None


def check_event(config: AgentConfig, topic: str, payload: bytes) -> TopicRule:
    """The rule for a valid event; raise `InvalidEvent` for an invalid one."""
    problem = topic_problem(topic)
    if problem is not None:
        raise InvalidEvent(topic, problem)
    rule = config.rule_for(topic)
    if len(payload) > rule.max_payload:
        raise InvalidEvent(
            topic,
            f"payload of {len(payload)} bytes is over max_payload {rule.max_payload} "
            f"of the rule {rule.filter!r}",
        )
    return rule


class Acceptor:
    def __init__(
        self,
        config: AgentConfig,
        buffer: Buffer,
        clock: Clock,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.buffer = buffer
        self.clock = clock
        self.on_commit = on_commit
        """Called with the highest priority among newly committed events (wakes the uplink)."""

    def prepare(self, topic: str, payload: bytes, event_time: float | None = None) -> NewEvent:
        """Check one event and apply its topic rule; raise `InvalidEvent`."""
        rule = check_event(self.config, topic, payload)
        when = self.clock.time() if event_time is None else event_time
        return NewEvent(
            topic=topic,
            payload=payload,
            qos=rule.qos,
            priority=rule.priority,
            event_time_ms=int(when * 1000),
            ttl=rule.ttl,
            on_full=rule.on_full,
        )

    async def accept(self, topic: str, payload: bytes) -> int:
        """Store one event; return its seq once committed. Raises `InvalidEvent`, `BufferFull`."""
        event = self.prepare(topic, payload)
        seq = await self.buffer.append_one(event)
        if self.on_commit is not None:
            self.on_commit(event.priority)
        return seq

    async def accept_many(self, events: Sequence[NewEvent]) -> list[int | BufferFull]:
        results = await self.buffer.append(events)
        if self.on_commit is not None:
            committed = [e.priority for e, r in zip(events, results, strict=True) if type(r) is int]
            if committed:
                self.on_commit(max(committed))
        return results
