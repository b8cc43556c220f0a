"""Agent configs written to disk, and the agent as a real subprocess."""

from __future__ import annotations

from pathlib import Path

from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ManagedProcess, ProcessFactory, console_script
from tests.harness.sink import AUD

__all__ = ["AGENT_READY", "start_agent", "uplink_section", "write_config"]

AGENT_READY = r"listener on 127\.0\.0\.1:(?P<port>\d+)"

DEFAULT_TOPICS = """
[[topics]]
filter = "alarms/#"
qos = 2
priority = 9
on_full = "reject"

[[topics]]
filter = "bulk/#"
qos = 0
on_full = "drop-oldest"
max_payload = "1KiB"

[[topics]]
filter = "#"
qos = 1
"""


def write_config(
    directory: Path,
    *,
    device_id: str = "dev-1",
    buffer: str = "",
    listener: str = "port = 0",
    uplink: str = "",
    topics: str = DEFAULT_TOPICS,
) -> Path:
    """An agent.toml in ``directory`` with its data directory next to it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    path.write_text(
        f'[agent]\ndevice_id = "{device_id}"\ndata_dir = "{directory / "data"}"\n\n'
        f"[buffer]\n{buffer}\n\n[listener]\n{listener}\n{uplink}\n{topics}"
    )
    return path


def uplink_section(
    pki: Pki,
    device: DeviceCreds,
    port: int,
    *,
    host: str = "localhost",
    token: str = f'audience = "{AUD}"',
    extra: str = "",
) -> str:
    """An [uplink] to ``host:port`` with the device's certificate and a device-signed token
    for the test sink's audience; ``extra`` adds keys to [uplink]."""
    return (
        f'[uplink]\nhost = "{host}"\nport = {port}\nbackoff_initial = "100ms"\n'
        f'backoff_max = "1s"\nrefused_backoff_initial = "1s"\nrefused_backoff_max = "2s"\n{extra}\n'
        f'[uplink.tls]\nca = "{pki.ca_cert}"\ncert = "{device.cert}"\nkey = "{device.key}"\n'
        f"[uplink.token]\n{token}\n"
    )


def start_agent(
    processes: ProcessFactory,
    config: Path,
    *,
    env: dict[str, str] | None = None,
    start: bool = True,
) -> ManagedProcess:
    """``edge-agent run`` on a free port; restarts reuse the port and the data directory. With
    ``start=False`` it is only made (the caller awaits its ``start``)."""
    return processes(
        [console_script("edge-agent"), "--config", str(config), "run", "--listen-port", "{port}"],
        ready=AGENT_READY,
        name="edge-agent",
        env=env,
        start=start,
    )
