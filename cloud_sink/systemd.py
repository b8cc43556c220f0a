"""The sink as a systemd service: its status line and where ``cloud-sink install`` puts it.

The notification protocol itself (READY, STATUS, WATCHDOG, STOPPING) is `mqtt_ingest.systemd`.
"""

from __future__ import annotations

from cloud_sink.health import BackendState
from cloud_sink.service import Sink
from mqtt_ingest.install import ServiceLayout
from mqtt_ingest.systemd import ServiceStatus

__all__ = ["LAYOUT", "status"]

LAYOUT = ServiceLayout(
    name="cloud-sink",
    package="cloud_sink",
    config_name="sink.toml",
    description="cloud-sink MQTT ingest into the core queue",
)


def status(sink: Sink) -> ServiceStatus:
    """``3 connections on :8883; core queue sqlite up`` (or ``down: why``)."""
    connections = sink.server.connection_count
    backend = sink.backend
    queue = f"core queue {sink.config.backend.type} {backend.state.value}"
    if backend.state is BackendState.DOWN and backend.reason:
        queue += f": {backend.reason}"
    plural = "" if connections == 1 else "s"
    text = f"{connections} connection{plural} on :{sink.port}; {queue}"
    return ServiceStatus(backend.state.value, text)
