"""The sink's Prometheus metrics (SPEC §7, docs/metrics.md).

`SinkMetrics` owns one `CollectorRegistry` of its own (nothing goes into prometheus-client's global
one, so several sinks can share a process) and reads at scrape time:

- the sink's `Counters` (the ingest server's and the forwarder's / health guard's), every name
  exported, the core-queue ones labelled with the backend type;
- the ingest server's open connections, the health guard's state, readiness;
- the core queue's confirm latency, measured by `SinkMetrics.timed`: a `CoreQueue` in front of the
  health guard that times every publish from the call to the backend's confirm;
- the process: prometheus-client's process collector and ``/proc/self/io``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud_sink.backends.base import (
    CoreMessage,
    CoreQueue,
    DeadLetterMessage,
    PublishOutcome,
)
from cloud_sink.health import BackendDown, BackendGuard, BackendState
from mqtt_ingest import Counters, IngestServer
from mqtt_ingest.prometheus import (
    INGEST_COUNTERS,
    CountersCollector,
    CounterSpec,
    ProcessIoCollector,
    gauge,
)

__all__ = ["CONFIRM_SECONDS_BUCKETS", "SinkMetrics", "sink_counters"]

CONFIRM_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def sink_counters(backend: str) -> dict[str, CounterSpec]:
    """How the sink's `Counters` names are exported (the ingest server's, and the sink's own)."""
    const = (("backend", backend),)
    return {
        **INGEST_COUNTERS,
        "forwarded": CounterSpec(
            "forwarded_events",
            "Events by outcome: confirmed by the core queue (stored, duplicate, dead_letter) or"
            " refused (too large for the backend even as a dead letter: not acknowledged).",
            "outcome",
            zeros=("stored", "duplicate", "dead_letter", "refused"),
            const=const,
        ),
        "backend_outages": CounterSpec(
            "core_queue_outages", "Core-queue outages (transitions to down).", const=const
        ),
        "backend_probes": CounterSpec(
            "core_queue_probes",
            "Probes of a core queue that was down, by outcome.",
            "outcome",
            zeros=("ok", "failed"),
            const=const,
        ),
    }


def _version() -> str:
    try:
        return metadata.version("mqtt-edge-bridge")
    except metadata.PackageNotFoundError:
        return "unknown"


class SinkMetrics:
    """The sink's registry; ``registry`` is what the endpoint serves.

    ``server``, ``guard``, ``not_ready`` and ``crl`` are read at scrape time (None before they
    exist).
    """

    def __init__(
        self,
        counters: Counters,
        backend: str,
        *,
        server: Callable[[], IngestServer | None],
        guard: Callable[[], BackendGuard | None],
        not_ready: Callable[[], str | None],
        crl: Callable[[], x509.CertificateRevocationList | None] = lambda: None,
        disk: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.backend = backend
        self._server = server
        self._guard = guard
        self._not_ready = not_ready
        self._crl = crl
        self._disk = disk
        self._confirm = Histogram(
            "cloud_sink_core_queue_confirm_seconds",
            "From handing a batch to the core queue to its confirm (successful calls only).",
            ["backend", "operation"],
            buckets=CONFIRM_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._errors = Counter(
            "cloud_sink_core_queue_errors",
            "Core-queue calls that failed (nothing of theirs was acknowledged); not the calls"
            " refused during an outage without asking the backend.",
            ["backend", "operation"],
            registry=self.registry,
        )
        for operation in ("publish", "dead_letter"):  # every series from the start, at 0
            self._confirm.labels(backend, operation)
            self._errors.labels(backend, operation)
        self.registry.register(CountersCollector(counters, "cloud_sink_", sink_counters(backend)))
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        self.registry.register(ProcessIoCollector())

    def timed(self, queue: CoreQueue) -> CoreQueue:
        """``queue`` with every publish and dead-letter call timed (put it in front of the
        health guard, so that what is timed is what the forwarder waits for)."""
        return _TimedQueue(
            queue,
            self._confirm.labels(self.backend, "publish"),
            self._confirm.labels(self.backend, "dead_letter"),
            self._errors.labels(self.backend, "publish"),
            self._errors.labels(self.backend, "dead_letter"),
        )

    def _families(self) -> list[Metric]:
        info = GaugeMetricFamily(
            "cloud_sink_info",
            "The sink: version, backend type (always 1).",
            labels=["version", "backend"],
        )
        info.add_metric([_version(), self.backend], 1)
        families: list[Metric] = [info]
        server = self._server()
        connections = GaugeMetricFamily(
            "cloud_sink_connections", "Open MQTT connections (CONNECT pending or accepted)."
        )
        connections.add_metric([], server.connection_count if server is not None else 0)
        families.append(connections)
        guard = self._guard()
        up = GaugeMetricFamily(
            "cloud_sink_core_queue_up",
            "1 while the core queue is up, 0 during an outage or once closed.",
            labels=["backend"],
        )
        up.add_metric(
            [self.backend], 1 if guard is not None and guard.state is BackendState.UP else 0
        )
        families.append(up)
        ready = GaugeMetricFamily(
            "cloud_sink_ready", "1 while /readyz would answer 200 (listening, core queue up)."
        )
        ready.add_metric([], 1 if self._not_ready() is None else 0)
        families.append(ready)
        crl = self._crl()
        if crl is not None and crl.next_update_utc is not None:
            # Past it OpenSSL refuses every device: alert well before.
            next_update = GaugeMetricFamily(
                "cloud_sink_tls_crl_next_update_timestamp_seconds",
                "Next update of the CRL in use (unix time): every handshake fails after it.",
            )
            next_update.add_metric([], crl.next_update_utc.timestamp())
            families.append(next_update)
        disk = self._disk()
        if disk is not None:
            free, reserve = disk
            families.append(
                gauge(
                    "cloud_sink_core_queue_disk_free_bytes",
                    "Free bytes on the sqlite core queue's filesystem (statvfs, at the scrape).",
                    free,
                )
            )
            families.append(
                gauge(
                    "cloud_sink_core_queue_disk_reserve_bytes",
                    "[backend] disk_reserve: a write cutting into it is an outage.",
                    reserve,
                )
            )
        return families


class _Collector(Collector):
    def __init__(self, metrics: SinkMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics._families()


class _TimedQueue:
    """A `CoreQueue` that times another one (see `SinkMetrics.timed`)."""

    def __init__(
        self,
        queue: CoreQueue,
        publish_seconds: Histogram,
        dead_letter_seconds: Histogram,
        publish_errors: Counter,
        dead_letter_errors: Counter,
    ) -> None:
        self._queue = queue
        self.refusal = queue.refusal  # asked per message: no pass-through call per layer
        self.recheck_limits = queue.recheck_limits
        self._publish_seconds = publish_seconds
        self._dead_letter_seconds = dead_letter_seconds
        self._publish_errors = publish_errors
        self._dead_letter_errors = dead_letter_errors

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        started = time.monotonic()
        try:
            outcome = await self._queue.publish(messages)
        except BackendDown:
            raise
        except Exception:
            self._publish_errors.inc()
            raise
        self._publish_seconds.observe(time.monotonic() - started)
        return outcome

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        started = time.monotonic()
        try:
            await self._queue.dead_letter(messages)
        except BackendDown:
            raise
        except Exception:
            self._dead_letter_errors.inc()
            raise
        self._dead_letter_seconds.observe(time.monotonic() - started)

    async def probe(self) -> None:
        await self._queue.probe()

    async def aclose(self) -> None:
        await self._queue.aclose()
