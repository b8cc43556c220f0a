"""The one acceptance path every source goes through (listener, CLI, Python API).

An event is checked at the door, once (STYLE 13): its topic must be a valid MQTT topic name with
no empty level, short enough to be sent with the uplink's ``topic_template``, and its payload
within its topic rule's ``max_payload``. Nothing invalid is stored; the caller gets `InvalidEvent`
saying what and why. The topic's rule then decides the uplink QoS, priority, TTL and what happens
when the buffer is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from edge_agent.buffer import Buffer, BufferFull, NewEvent
from edge_agent.config import AgentConfig, TopicRule
from mqtt_ingest.clock import Clock
from mqtt_ingest.topics import MAX_TOPIC_BYTES, topic_problem

__all__ = [
    "MAX_TOPIC_BYTES",
    "Acceptor",
    "InvalidEvent",
    "check_event",
    "topic_problem",
    "uplink_topic_problem",
]

RULE_CACHE_TOPICS = 4096
"""How many valid topics `Acceptor` remembers the rule of (then it starts over)."""


class InvalidEvent(ValueError):
    """An event refused at the door; nothing was stored."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"refused event on {topic[:200]!r}: {reason}")
        self.topic = topic
        self.reason = reason


def uplink_topic_problem(config: AgentConfig, topic: str) -> str | None:
    """Why ``topic`` cannot be sent with the uplink's ``topic_template``, or None."""
    uplink = config.uplink
    if uplink is None:
        return None
    sent = uplink.uplink_topic(config.agent.device_id, topic)
    size = len(sent.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        return (
            f"sent as {uplink.topic_template!r} the topic would be {size} bytes, over MQTT's"
            f" {MAX_TOPIC_BYTES}"
        )
    # The template's text next to {topic} can make a level of the two that neither has alone
    # ('%' + '2e%2e' percent-decodes to '..'): the sink would close the link on it, each time.
    problem = topic_problem(sent)
    if problem is not None:
        return f"sent as {uplink.topic_template!r} the topic would be {sent[:200]!r}: {problem}"
    return None


def check_event(config: AgentConfig, topic: str, payload: bytes) -> TopicRule:
    """The rule for a valid event; raise `InvalidEvent` for an invalid one."""
    problem = topic_problem(topic) or uplink_topic_problem(config, topic)
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


_new_event = tuple.__new__  # a NewEvent from its fields, in C (a named tuple's __new__ is Python)


class Acceptor:
    def __init__(self, config: AgentConfig, buffer: Buffer, clock: Clock) -> None:
        self._rules: dict[str, TopicRule] = {}
        self.config = config
        self.buffer = buffer
        self.clock = clock

    @property
    def config(self) -> AgentConfig:
        return self._config

    @config.setter
    def config(self, config: AgentConfig) -> None:
        self._config = config
        self._rules = {}

    def prepare(self, topic: str, payload: bytes, event_time: float | None = None) -> NewEvent:
        """Check one event and apply its topic rule; raise `InvalidEvent`, or `TypeError` for a
        payload that is not bytes."""
        if type(payload) is not bytes and not isinstance(payload, (bytes, bytearray, memoryview)):
            # Here, at the call: the group insert binds `bytearray(payload)` on the committer's
            # thread, where a str would fail the commit of every event grouped with it.
            raise TypeError(
                f"payload must be bytes, not {type(payload).__name__} (topic {topic[:200]!r})"
            )
        # Devices publish on few topics, again and again: the topic checks and the rule lookup
        # (a third of the per-event work of Agent.publish) are done once per topic.
        rule = self._rules.get(topic)
        if rule is None or len(payload) > rule.max_payload:
            rule = check_event(self._config, topic, payload)
            if len(self._rules) >= RULE_CACHE_TOPICS:
                self._rules = {}
            self._rules[topic] = rule
        when = self.clock.time() if event_time is None else event_time
        return _new_event(
            NewEvent,
            (topic, payload, rule.qos, rule.priority, int(when * 1000), rule.ttl, rule.on_full),
        )

    def accept(self, topic: str, payload: bytes) -> Awaitable[int]:
        """Store one event: ``await`` it for its seq, returned once committed.

        Raises `InvalidEvent` (at the call) or `BufferFull` (from the await). A plain function
        returning the buffer's future: no coroutine per event on the hot path.
        """
        return self.buffer.append_one(self.prepare(topic, payload))

    async def accept_many(self, events: Sequence[NewEvent]) -> list[int | BufferFull]:
        """Store ``events`` (one group commit); cancelled before the commit began, none is."""
        appended = self.buffer.append(events)
        try:
            return await appended
        except asyncio.CancelledError:
            self.buffer.withdraw(appended)
            raise
