"""`Counters` as Prometheus counter families, and the process's storage I/O.

`CountersCollector` reads a `Counters` at scrape time and exports each counter name through a
`CounterSpec` (its Prometheus name, help text, and which label carries the counter's reason), so
the hot path keeps its one dict increment. A counter name without a spec is still exported, as
``<prefix><name>_total{reason}``: a counter added later is never silently missing.

Reasons can be open-ended (a CONNECT refusal names what was wrong with the token), so each family
admits at most ``max_label_values`` distinct reasons (its ``zeros`` first, then first come first
kept, for the collector's life); later ones are summed under ``other``. Each series therefore
only ever grows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mqtt_ingest.metrics import Counters

__all__ = ["INGEST_COUNTERS", "CounterSpec", "CountersCollector", "ProcessIoCollector", "gauge"]

OTHER = "other"


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """How one `Counters` name is exported.

    ``metric``: the name after the collector's prefix, without ``_total``. ``label``: the label
    that carries the counter's reason (None: reasons are summed). ``unlabelled``: the label value
    for increments without a reason. ``zeros``: label values exported as 0 before any increment.
    ``const``: labels with the same value on every series (e.g. the backend type).
    """

    metric: str
    documentation: str
    label: str | None = None
    unlabelled: str = ""
    zeros: tuple[str, ...] = ()
    const: tuple[tuple[str, str], ...] = ()


INGEST_COUNTERS: Mapping[str, CounterSpec] = {
    "connections_opened": CounterSpec("connections_opened", "TCP connections accepted."),
    "connections_refused": CounterSpec(
        "connections_refused", "Connections refused before or at CONNECT, by reason.", "reason"
    ),
    "connections_closed": CounterSpec(
        "connections_closed", "Connections closed, by reason.", "reason"
    ),
    "connects_accepted": CounterSpec("connects_accepted", "CONNECTs accepted (CONNACK 0)."),
    "takeovers": CounterSpec(
        "session_takeovers", "Connections closed because their client id connected again."
    ),
    "malformed": CounterSpec(
        "malformed_packets",
        "Malformed packets after CONNECT (each closes its connection), by reason.",
        "reason",
        unlabelled="malformed",
    ),
    "publish_bytes_received": CounterSpec(
        "publish_received_bytes", "Bytes of PUBLISH packets received."
    ),
    "security_events": CounterSpec(
        "security_events", "Publishes or subscriptions outside the client's rights.", "reason"
    ),
    "qos2_duplicates": CounterSpec(
        "qos2_duplicates", "QoS 2 publishes resent before PUBREL (answered, not stored again)."
    ),
    "events_received": CounterSpec("events_received", "PUBLISHes taken for the durable stage."),
    "qos0_dropped": CounterSpec(
        "qos0_dropped",
        "QoS 0 events of closed connections not stored: too many of them were queued already.",
    ),
    "events_acked": CounterSpec("events_acked", "Events acknowledged (PUBACK/PUBREC)."),
    "stage_events": CounterSpec(
        "stage_events",
        "Events handed to the durable stage, by outcome.",
        "outcome",
        zeros=("stored", "refused", "failed"),
    ),
    "stage_batches": CounterSpec("stage_batches", "Batches handed to the durable stage."),
}
"""The ingest server's counters (mqtt_ingest/server.py, batching.py)."""

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class CountersCollector(Collector):
    """Exports ``counters`` under ``prefix`` (e.g. ``"cloud_sink_"``) as described by ``specs``."""

    def __init__(
        self,
        counters: Counters,
        prefix: str,
        specs: Mapping[str, CounterSpec],
        *,
        max_label_values: int = 32,
    ) -> None:
        self._counters = counters
        self._prefix = prefix
        self._specs = specs
        self._max_label_values = max_label_values
        self._admitted: dict[str, set[str]] = {}

    def collect(self) -> Iterable[Metric]:
        values: dict[str, dict[str, int]] = {}
        for name, reason, value in self._counters.items():
            by_reason = values.setdefault(name, {})
            by_reason[reason] = by_reason.get(reason, 0) + value
        return list(self._families(values))

    def _families(self, values: dict[str, dict[str, int]]) -> Iterator[Metric]:
        for name in sorted(set(self._specs) | set(values)):
            by_reason = values.get(name, {})
            spec = self._specs.get(name) or _fallback(name, by_reason)
            const_names = [key for key, _ in spec.const]
            const_values = [value for _, value in spec.const]
            labels = const_names + ([spec.label] if spec.label else [])
            family = CounterMetricFamily(
                self._prefix + spec.metric, spec.documentation, labels=labels
            )
            if spec.label is None:
                family.add_metric(const_values, sum(by_reason.values()))
                yield family
                continue
            series = dict.fromkeys(spec.zeros, 0)
            for reason, value in by_reason.items():
                label = self._admit(name, spec, reason or spec.unlabelled)
                series[label] = series.get(label, 0) + value
            for label, value in sorted(series.items()):
                family.add_metric([*const_values, label], value)
            yield family

    def _admit(self, name: str, spec: CounterSpec, value: str) -> str:
        # The zeros are admitted first: a series exported at 0 must be the one that counts.
        admitted = self._admitted.setdefault(name, set(spec.zeros))
        if value in admitted:
            return value
        if len(admitted) < self._max_label_values:
            admitted.add(value)
            return value
        return OTHER


def _fallback(name: str, by_reason: Mapping[str, int]) -> CounterSpec:
    label = "reason" if any(by_reason) else None
    return CounterSpec(_INVALID.sub("_", name), f"Counter {name!r}.", label)


class ProcessIoCollector(Collector):
    """``process_io_read_bytes_total`` / ``process_io_write_bytes_total``: what this process
    made the kernel read from and write to storage (``/proc/self/io``; absent where unreadable).
    The figures are for the whole process, whatever else runs in it."""

    def __init__(self, path: Path = Path("/proc/self/io")) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        try:
            text = self._path.read_text()
        except OSError:
            return []
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        families: list[Metric] = []
        for key, what in (("read_bytes", "read from"), ("write_bytes", "written to")):
            if key in fields:
                family = CounterMetricFamily(
                    f"process_io_{key}",
                    f"Bytes this process caused to be {what} storage (/proc/self/io {key}).",
                )
                family.add_metric([], int(fields[key]))
                families.append(family)
        return families


def gauge(name: str, documentation: str, value: float) -> Metric:
    """One unlabelled gauge family with its value."""
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
