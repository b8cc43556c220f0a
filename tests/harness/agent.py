"""Agent configs written to disk, and the agent as a real subprocess."""

from __future__ import annotations

from pathlib import Path

from tests.harness.process import ManagedProcess, ProcessFactory, console_script

__all__ = ["AGENT_READY", "start_agent", "write_config"]

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
    topics: str = DEFAULT_TOPICS,
) -> Path:
    """An agent.toml in ``directory`` with its data directory next to it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    path.write_text(
        f'[agent]\ndevice_id = "{device_id}"\ndata_dir = "{directory / "data"}"\n\n'
        f"[buffer]\n{buffer}\n\n[listener]\n{listener}\n{topics}"
    )
    return path


def start_agent(
    processes: ProcessFactory, config: Path, *, env: dict[str, str] | None = None
) -> ManagedProcess:
    """``edge-agent run`` on a free port; restarts reuse the port and the data directory."""
    return processes(
        [console_script("edge-agent"), "--config", str(config), "run", "--listen-port", "{port}"],
        ready=AGENT_READY,
        name="edge-agent",
        env=env,
    )
