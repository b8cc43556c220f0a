"""How buffered events become MQTT messages on the uplink (SPEC §3, §5): one event per message
in ``raw`` format; in ``batch-v2`` (or ``-v1``), consecutive events of one topic and QoS per
batch envelope, bounded by ``[uplink.batch]`` ``max_events`` and ``max_bytes``. Events the
connection was lost on before (attempts >= 1) go first: once, in rounds that double; more
often, alone in flight (poison handling, see `edge_agent.uplink`).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.buffer import StoredEvent
from edge_agent.config import UplinkConfig
from mqtt_ingest.envelope import encode

__all__ = ["Message", "Messages"]

_ENVELOPE_OVERHEAD = 64  # header of a batch envelope, generously
_EVENT_OVERHEAD = 24  # per event in an envelope: seq, time and length (v1: varints), generously
_PACKET_OVERHEAD = 9  # of a PUBLISH: fixed header (<= 5), topic length (2), packet id (2)


@dataclass(slots=True)
class Message:
    seqs: list[int]  # the events it carries (their payloads are only in ``payload``)
    priority: int
    topic: str
    payload: bytes
    qos: int
    alone: bool  # nothing else may be in flight with it
    ramp: bool  # resent after one loss: in a round of 1, 2, 4... messages (`ConnectionDrain`)
    single: StoredEvent | None  # the event, when it is the only one (poison handling)
    sent_at: float = 0.0  # loop time it was handed to paho
    number: int = 0  # how many messages the connection had published before this one


@dataclass(frozen=True, slots=True)
class Messages:
    """The messages of one connection: its settings (the format it announced at CONNECT), the
    device and the buffer's epoch (part of each event id in an envelope)."""

    config: UplinkConfig
    device_id: str
    epoch: str

    def drain_order(self, events: list[StoredEvent]) -> list[Message]:
        """Messages in drain order: events lost more than once first, each in a message alone in
        flight; then those lost once, in rounds (``ramp``); then the rest."""
        fresh = [e for e in events if e.attempts == 0]
        once = [e for e in events if e.attempts == 1]
        more = [e for e in events if e.attempts >= 2]
        messages: list[Message] = []
        for event in more:
            messages += self.of([event], alone=True)
        if once:
            messages += self.of(once, ramp=True)
        messages += self.of(fresh)
        return messages

    def of(
        self, events: list[StoredEvent], *, alone: bool = False, ramp: bool = False
    ) -> list[Message]:
        """``events`` (in drain order) as messages, each to go ``alone`` in flight, in a
        ``ramp`` round, or neither."""
        device = self.device_id
        config = self.config
        version = config.envelope_version
        if version is None:
            return [
                Message(
                    [e.seq],
                    e.priority,
                    config.uplink_topic(device, e.topic),
                    e.payload,
                    e.qos,
                    alone,
                    ramp,
                    e,
                )
                for e in events
            ]
        # By topic: each topic's runs go in seq order. (Grouped by topic and QoS, a topic whose
        # rule's QoS changed twice went up out of order: QoS 1 seqs 1-5 and 11-15, then 6-10.)
        groups: dict[str, list[list[StoredEvent]]] = {}
        sizes: dict[str, int] = {}
        room: dict[str, int] = {}
        limit = config.batch
        # `max_bytes` bounds the whole PUBLISH packet, as the sink's max_packet_size does: the
        # envelope went up to it and the topic on top, and a packet at the sink's limit closed
        # the connection (then sent again, and again, until its events went alone).
        overhead = _ENVELOPE_OVERHEAD + _PACKET_OVERHEAD  # (compressed only if smaller)
        for event in events:
            key = event.topic
            runs = groups.get(key)
            if runs is None:
                runs = groups[key] = [[]]
                topic_bytes = len(config.uplink_topic(device, key).encode())
                room[key] = limit.max_bytes - overhead - topic_bytes
            size = len(event.payload) + _EVENT_OVERHEAD
            if runs[-1] and (
                len(runs[-1]) >= limit.max_events
                or sizes[key] + size > room[key]
                # Seqs must increase within an envelope. In drain order (priority first) they
                # do not when a topic's rows have two priorities (its rule changed): one
                # envelope of both failed to encode on every connection, and the uplink stalled.
                or event.seq <= runs[-1][-1].seq
                # One QoS per message: an event keeps the QoS its rule had when it was
                # accepted.
                or event.qos != runs[-1][-1].qos
            ):
                runs.append([])
                sizes[key] = 0
            runs[-1].append(event)
            sizes[key] = sizes.get(key, 0) + size
        return [
            Message(
                [e.seq for e in run],
                max(e.priority for e in run),
                config.uplink_topic(device, topic),
                encode(self.epoch, run, version=version, zstd_level=limit.zstd_level),
                run[0].qos,
                alone,
                ramp,
                run[0] if len(run) == 1 else None,
            )
            for topic, runs in groups.items()
            for run in runs
        ]
