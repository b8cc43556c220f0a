"""The agent as a systemd service: its status line and where ``edge-agent install`` puts it.

The notification protocol itself (READY, STATUS, WATCHDOG, STOPPING) is `mqtt_ingest.systemd`.
"""

from __future__ import annotations

from edge_agent.service import Agent
from mqtt_ingest.install import ServiceLayout
from mqtt_ingest.systemd import ServiceStatus

__all__ = ["LAYOUT", "status"]

LAYOUT = ServiceLayout(
    name="edge-agent",
    package="edge_agent",
    config_name="agent.toml",
    description="edge-agent store-and-forward MQTT bridge",
)


def status(agent: Agent) -> ServiceStatus:
    """``uplink online to sink:8883; backlog 12 events, 3.4 KiB`` (cheap: no database query)."""
    events, size = agent.buffer.backlog
    backlog = f"backlog {events} events, {_size(size)}"
    uplink = agent.uplink
    if uplink is None:
        return ServiceStatus("buffer-only", f"no uplink configured (buffering only); {backlog}")
    link = uplink.status
    text = f"uplink {link.state.value} {link.server}"
    if detail := link.detail_at(uplink.clock.time()):
        text += f" ({detail})"
    return ServiceStatus(link.state.value, f"{text}; {backlog}")


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
