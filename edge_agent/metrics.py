"""The agent's Prometheus metrics (SPEC §5, docs/metrics.md).

`AgentMetrics` owns one `CollectorRegistry` of its own and reads everything at scrape time, so the
accept path pays for nothing but the commit-latency histogram (one observation per group commit):

- the buffer: fill level and ``accepted`` from its memory; per-topic backlog, drops (the ``drops``
  table, kept across restarts), dead letters and incidents from `Buffer.stats`, which runs on the
  buffer's own thread and scans ``events``. Commits wait for that scan, so it runs at most every
  ``[metrics] backlog_refresh`` and at most ``1 / SCAN_DUTY`` of the time (a 0.3 s scan of a
  large backlog: at most every 15 s); in between, scrapes get the last figures and their age;
- the uplink: its in-memory `LinkStatus` (state, connections, delivered, dead-lettered, expiry);
- the local listener: the ingest server's `Counters`;
- the process: prometheus-client's process collector and ``/proc/self/io``.

Nothing is registered in prometheus-client's global registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from importlib import metadata

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.buffer import Buffer, BufferStats, TopicStats
from edge_agent.config import AgentConfig
from edge_agent.link import LinkState
from edge_agent.uplink import Uplink
from mqtt_ingest import Counters, IngestServer
from mqtt_ingest.clock import Clock
from mqtt_ingest.disk import free_bytes
from mqtt_ingest.lifecycle import drop_outcome
from mqtt_ingest.prometheus import (
    INGEST_COUNTERS,
    CountersCollector,
    ProcessIoCollector,
    gauge,
)

__all__ = ["OTHER_TOPICS", "SCAN_DUTY", "AgentMetrics"]

SCAN_DUTY = 50
"""A backlog scan that took S seconds is not repeated within ``SCAN_DUTY * S`` seconds."""
OTHER_TOPICS = "#other"
"""The topic label of the backlog beyond ``max_topics`` (no topic name can contain '#')."""
KNOWN_DROP_REASONS = ("buffer-full", "ttl")
COMMIT_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
COMMIT_EVENTS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


def _version() -> str:
    try:
        return metadata.version("mqtt-edge-bridge")
    except metadata.PackageNotFoundError:
        return "unknown"


class AgentMetrics:
    """The agent's registry and what refreshes it; ``registry`` is what the endpoint serves.

    Create it right after the buffer is open (it instruments the buffer's group commit); call
    `refresh` before each scrape.
    """

    def __init__(
        self,
        config: AgentConfig,
        buffer: Buffer,
        clock: Clock,
        *,
        uplink: Uplink | None,
        listener: Callable[[], IngestServer | None],
    ) -> None:
        self.registry = CollectorRegistry()
        self._config = config
        self._buffer = buffer
        self._clock = clock
        self._uplink = uplink
        self._listener = listener
        self._stats: BufferStats | None = None
        self._stats_at = 0.0
        self._scan_seconds = 0.0
        self._scan: asyncio.Task[None] | None = None  # a backlog scan under way
        self._listener_counters: CountersCollector | None = None
        self._commit_seconds = Histogram(
            "edge_agent_buffer_commit_seconds",
            "Duration of a group commit's transaction on the buffer thread, fsync included.",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._commit_events = Histogram(
            "edge_agent_buffer_commit_events",
            "Events committed per group commit.",
            buckets=COMMIT_EVENTS_BUCKETS,
            registry=self.registry,
        )
        buffer.on_commit_timed = self._observe_commit
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        self.registry.register(ProcessIoCollector())

    def _observe_commit(self, seconds: float, events: int) -> None:
        self._commit_seconds.observe(seconds)
        self._commit_events.observe(events)

    async def refresh(self) -> None:
        """Scan the buffer again unless the last scan is recent enough (module docstring), or
        wait for the scan under way. A scrape that stops waiting (its refresh timeout) leaves the
        scan running: its figures serve the next scrapes, which otherwise each started a scan
        of their own, never got one, and held the commits back with each."""
        if self._scan is None:
            settings = self._config.metrics
            pause = max(settings.backlog_refresh, SCAN_DUTY * self._scan_seconds)
            if self._stats is not None and time.monotonic() - self._stats_at < pause:
                return
            self._scan = asyncio.get_running_loop().create_task(
                self._rescan(), name="edge_agent.metrics.scan"
            )
            # A scan nobody waits for any more may fail (the scrape that waited logged it, or
            # the next one will): not an "exception never retrieved" at exit.
            self._scan.add_done_callback(drop_outcome)
        await asyncio.shield(self._scan)

    async def aclose(self) -> None:
        """Stop a scan under way (the agent is stopping: nobody will read it)."""
        if self._scan is not None:
            self._scan.cancel()
            await asyncio.gather(self._scan, return_exceptions=True)

    async def _rescan(self) -> None:
        started = time.monotonic()
        try:
            stats = await self._buffer.stats()
        finally:
            self._scan = None
        self._stats_at = time.monotonic()
        self._scan_seconds = self._stats_at - started
        self._stats = stats

    # -- what _Collector reads -------------------------------------------------------------------

    def _families(self) -> list[Metric]:
        families = [self._info(), *self._buffer_families(), *self._uplink_families()]
        if self._stats is not None:
            families += self._stats_families(self._stats)
        families += self._listener_families()
        return families

    def _info(self) -> Metric:
        info = GaugeMetricFamily(
            "edge_agent_info",
            "The agent: device id, buffer epoch, version (always 1).",
            labels=["device_id", "epoch", "version"],
        )
        info.add_metric([self._config.agent.device_id, self._buffer.epoch, _version()], 1)
        return info

    def _buffer_families(self) -> list[Metric]:
        events, size = self._buffer.backlog
        max_events, max_bytes = self._buffer.limits
        return [
            gauge("edge_agent_buffer_events", "Events in the buffer (exact, from memory).", events),
            gauge("edge_agent_buffer_bytes", "Payload bytes in the buffer (exact).", size),
            gauge("edge_agent_buffer_max_events", "[buffer] max_events.", max_events),
            gauge("edge_agent_buffer_max_bytes", "[buffer] max_bytes.", max_bytes),
            gauge(
                "edge_agent_dead_letter_bytes",
                "Payload bytes of the dead letters (exact): counted against max_bytes.",
                self._buffer.dead_letters[1],
            ),
            _counter(
                "edge_agent_accepted_events",
                "Events committed to the buffer (accepted) since the agent started.",
                self._buffer.accepted,
            ),
            *self._disk_families(),
        ]

    def _disk_families(self) -> list[Metric]:
        try:
            free = free_bytes(self._buffer.directory)
        except OSError:  # the directory vanished: nothing to say about it
            return []
        return [
            gauge(
                "edge_agent_disk_free_bytes",
                "Free bytes on the data directory's filesystem (statvfs, at the scrape).",
                free,
            ),
            gauge(
                "edge_agent_disk_reserve_bytes",
                "[buffer] disk_reserve: below it new events are refused or drop old ones.",
                self._config.buffer.disk_reserve,
            ),
        ]

    def _stats_families(self, stats: BufferStats) -> list[Metric]:
        now = self._clock.time()
        labels = ["topic"]
        backlog_events = GaugeMetricFamily(
            "edge_agent_backlog_events", "Events waiting in the buffer, per topic.", labels=labels
        )
        backlog_bytes = GaugeMetricFamily(
            "edge_agent_backlog_bytes", "Payload bytes waiting, per topic.", labels=labels
        )
        oldest = GaugeMetricFamily(
            "edge_agent_backlog_oldest_age_seconds",
            "Age of the oldest waiting event (its event time), per topic.",
            labels=labels,
        )
        for topic in _top_topics(stats.topics, self._config.metrics.max_topics):
            backlog_events.add_metric([topic.topic], topic.events)
            backlog_bytes.add_metric([topic.topic], topic.bytes)
            oldest.add_metric([topic.topic], max(0.0, now - topic.oldest_event_time_ms / 1000))
        dropped_events = CounterMetricFamily(
            "edge_agent_dropped_events",
            "Events dropped by policy, by reason (persistent across restarts).",
            labels=["reason"],
        )
        dropped_bytes = CounterMetricFamily(
            "edge_agent_dropped_bytes", "Payload bytes dropped, by reason.", labels=["reason"]
        )
        drops = dict.fromkeys(KNOWN_DROP_REASONS, (0, 0))
        for (reason, _), (events, size) in stats.drops.items():
            so_far = drops.get(reason, (0, 0))
            drops[reason] = (so_far[0] + events, so_far[1] + size)
        for reason, (events, size) in sorted(drops.items()):
            dropped_events.add_metric([reason], events)
            dropped_bytes.add_metric([reason], size)
        incidents = CounterMetricFamily(
            "edge_agent_buffer_incidents",
            "Buffer incidents recorded (corrupt: quarantined; reindexed; wal-missing; wal-damaged;"
            " wal-torn: an unacknowledged last commit cut by a power loss), by kind.",
            labels=["kind"],
        )
        kinds: dict[str, int] = {}
        for incident in stats.incidents:
            kinds[incident.kind] = kinds.get(incident.kind, 0) + 1
        for kind, count in sorted(kinds.items()):
            incidents.add_metric([kind], count)
        return [
            backlog_events,
            backlog_bytes,
            oldest,
            dropped_events,
            dropped_bytes,
            gauge(
                "edge_agent_dead_letters", "Events in the dead-letter table.", stats.dead_letters
            ),
            incidents,
            gauge(
                "edge_agent_backlog_scan_seconds",
                "How long the last scan of the buffer for the backlog figures took.",
                self._scan_seconds,
            ),
            gauge(
                "edge_agent_backlog_scan_age_seconds",
                "Age of the backlog, drop and dead-letter figures.",
                time.monotonic() - self._stats_at,
            ),
        ]

    def _uplink_families(self) -> list[Metric]:
        status = self._uplink.status if self._uplink is not None else None
        current = status.state if status is not None else LinkState.DISABLED
        state = GaugeMetricFamily(
            "edge_agent_uplink_state",
            "The uplink's state: 1 for the current one, 0 for the others.",
            labels=["state"],
        )
        for candidate in LinkState:
            state.add_metric([candidate.value], 1 if candidate is current else 0)
        families: list[Metric] = [
            state,
            _counter(
                "edge_agent_uplink_connections",
                "Uplink connections established (CONNACK accepted) since the agent started.",
                status.connections if status is not None else 0,
            ),
            _counter(
                "edge_agent_uplink_failures",
                "Connection attempts or connections that failed (each followed by a backoff).",
                status.failures if status is not None else 0,
            ),
            gauge(
                "edge_agent_uplink_inflight_messages",
                "MQTT messages sent on the uplink and not acknowledged yet.",
                self._uplink.in_flight if self._uplink is not None else 0,
            ),
            _counter(
                "edge_agent_delivered_events",
                "Events the sink or broker acknowledged since the agent started.",
                status.delivered if status is not None else 0,
            ),
            _counter(
                "edge_agent_dead_lettered_events",
                "Events moved to the dead-letter table since the agent started.",
                status.dead_lettered if status is not None else 0,
            ),
        ]
        if status is not None and status.certificate_not_after is not None:
            families.append(
                gauge(
                    "edge_agent_uplink_certificate_expiry_timestamp_seconds",
                    "When the device certificate expires (Unix time).",
                    status.certificate_not_after,
                )
            )
        if status is not None and status.token_expires_at is not None:
            families.append(
                gauge(
                    "edge_agent_uplink_token_expiry_timestamp_seconds",
                    "When the token of the current or last connection expires (Unix time).",
                    status.token_expires_at,
                )
            )
        return families

    def _listener_families(self) -> list[Metric]:
        listener = self._listener()
        if listener is None or not isinstance(listener.metrics, Counters):
            return []
        if self._listener_counters is None:
            self._listener_counters = CountersCollector(
                listener.metrics, "edge_agent_listener_", INGEST_COUNTERS
            )
        return [
            gauge(
                "edge_agent_listener_connections",
                "Open connections on the local listener.",
                listener.connection_count,
            ),
            *self._listener_counters.collect(),
        ]


class _Collector(Collector):
    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics._families()


def _top_topics(topics: list[TopicStats], limit: int) -> list[TopicStats]:
    """The ``limit`` largest backlogs, and the rest summed up as topic `OTHER_TOPICS`."""
    if len(topics) <= limit:
        return topics
    ranked = sorted(topics, key=lambda t: (-t.events, t.topic))
    rest = ranked[limit:]
    return [
        *ranked[:limit],
        TopicStats(
            OTHER_TOPICS,
            sum(t.events for t in rest),
            sum(t.bytes for t in rest),
            min(t.oldest_event_time_ms for t in rest),
        ),
    ]


def _counter(name: str, documentation: str, value: float) -> Metric:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
