"""sd_notify without libsystemd (SPEC §5 "systemd"): the notifier against a real datagram socket,
then the real ``edge-agent run`` and ``cloud-sink run`` under a fake systemd: READY=1, STATUS=,
WATCHDOG=1 from the event loop at half of WATCHDOG_USEC, STOPPING=1 at SIGTERM, and no ping
while the event loop is blocked."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from mqtt_ingest.systemd import (
    STALL_FAILPOINT,
    Notifier,
    ServiceStatus,
    Supervisor,
    watchdog_interval,
)
from tests.harness.agent import start_agent, uplink_section, write_config
from tests.harness.notify import Notification, NotifySocket
from tests.harness.pki import Pki
from tests.harness.process import ManagedProcess, ProcessFactory
from tests.harness.sink import CLOUD_SINK, write_sink_config

SINK_READY = r"cloud-sink ready: listening on 127\.0\.0\.1:(?P<port>\d+)"


def short_path(tmp_path: Path) -> Path:
    """A socket path under the 108-byte limit of sun_path, whatever pytest's tmp_path is."""
    path = tmp_path / "notify"
    if len(str(path)) > 100:
        path = Path(f"/tmp/bridge-notify-{os.getpid()}-{time.monotonic_ns()}")
    return path


# -- the protocol, in-process, against real sockets ------------------------------------------------


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog is None
    assert notifier.ready("status") is False
    assert notifier.ping() is False
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "x"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_datagrams_reach_a_path_or_an_abstract_socket(tmp_path: Path, kind: str) -> None:
    with NotifySocket(short_path(tmp_path) if kind == "path" else None) as sd:
        env = {"NOTIFY_SOCKET": sd.address, "WATCHDOG_USEC": "3000000"}
        notifier = Notifier.from_environment(env)
        assert notifier.watchdog == 1.5
        assert notifier.ready("link online\nbacklog 3")
        assert notifier.ping()
        assert notifier.reloading()
        assert notifier.stopping()
        got = [n.fields for n in _until(sd, 4)]
        notifier.close()
    assert got[0] == {"READY": "1", "STATUS": "link online backlog 3"}  # one line for systemctl
    assert got[1] == {"WATCHDOG": "1"}
    assert got[2]["RELOADING"] == "1"
    assert int(got[2]["MONOTONIC_USEC"]) > 0
    assert got[3] == {"STOPPING": "1", "STATUS": "stopping"}


def test_a_vanished_socket_loses_messages_without_raising(tmp_path: Path) -> None:
    path = short_path(tmp_path)
    with NotifySocket(path):
        pass
    path.unlink()
    notifier = Notifier(str(path))
    assert notifier.ping() is False  # systemd gone (or restarting): the service carries on
    with NotifySocket(path) as sd:
        assert notifier.ping() is True
        assert _until(sd, 1)[0].fields == {"WATCHDOG": "1"}
    notifier.close()


async def test_supervisor_sends_state_changes_at_once_and_counters_at_most_every_few_seconds(
    tmp_path: Path,
) -> None:
    current = ServiceStatus("online", "online; backlog 0")
    with NotifySocket(short_path(tmp_path)) as sd:
        notifier = Notifier(sd.address, watchdog=0.1)
        async with Supervisor(notifier, status_every=30.0) as supervisor:
            supervisor.ready(lambda: current)
            await asyncio.to_thread(sd.wait_for, lambda n: n.fields.get("READY") == "1")
            current = ServiceStatus("online", "online; backlog 7")  # a counter: held back
            await asyncio.sleep(2.5)
            current = ServiceStatus("backoff", "backoff (refused); backlog 9")  # a state: now
            changed = await asyncio.to_thread(
                sd.wait_for, lambda n: "backoff" in n.fields.get("STATUS", ""), 5.0
            )
            supervisor.stopping()
            current = ServiceStatus("online", "online again")  # after STOPPING: not sent
            await asyncio.sleep(2.5)
        statuses = [n.fields["STATUS"] for n in sd.with_field("STATUS")]
        pings = sd.pings()
    assert statuses == ["online; backlog 0", "backoff (refused); backlog 9", "stopping"]
    ready_at = sd.with_field("READY")[0].at
    assert changed.at - ready_at < 2.5 + 2.0  # within about a tick of the change
    assert len(pings) >= 30  # every 0.1 s over about 6 s, from the event loop
    assert max(gaps(pings)) < 1.0


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def _until(sd: NotifySocket, count: int, timeout: float = 10.0) -> list[Notification]:
    deadline = time.monotonic() + timeout
    while len(sd.received) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sd.received) >= count, sd.received
    return sd.received


# -- the real services --------------------------------------------------------------------------

WATCHDOG_USEC = 2_000_000  # pings expected every second


def _status(sd: NotifySocket, text: str, timeout: float = 30.0) -> Notification:
    return sd.wait_for(lambda n: text in n.fields.get("STATUS", ""), timeout)


def _check_pings(sd: NotifySocket, *, after: float, at_least: int) -> list[float]:
    deadline = time.monotonic() + 30
    while len([t for t in sd.pings() if t > after]) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    pings = sd.pings()
    between = gaps(pings)
    assert len([t for t in pings if t > after]) >= at_least, pings
    # systemd's deadline is WATCHDOG_USEC: every gap stays inside it; and the cadence is half
    # of it, not a flood.
    assert max(between) < WATCHDOG_USEC / 1e6, between
    assert 0.7 < statistics.median(between) < 1.4, between
    return pings


def _stop(process: ManagedProcess, sd: NotifySocket) -> Notification:
    ready = sd.with_field("READY", "1")[0]
    assert process.sigterm(timeout=30) == 0
    stopping = sd.wait_for(lambda n: n.fields.get("STOPPING") == "1", 5)
    assert stopping.at > ready.at
    return stopping


@pytest.mark.integration
def test_agent_and_sink_under_a_fake_systemd(
    process_factory: ProcessFactory, tmp_path: Path, pki: Pki
) -> None:
    with NotifySocket() as sink_sd, NotifySocket(short_path(tmp_path)) as agent_sd:
        sink = process_factory(
            [CLOUD_SINK, "--config", str(write_sink_config(tmp_path, pki)), "run"],
            ready=SINK_READY,
            name="cloud-sink",
            env={"NOTIFY_SOCKET": sink_sd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        )
        sink_ready = sink_sd.wait_for(lambda n: n.fields.get("READY") == "1")
        assert sink_ready.fields["STATUS"] == f"0 connections on :{sink.port}; core queue sqlite up"

        device = pki.device("dev-1")
        config = write_config(tmp_path / "agent", uplink=uplink_section(pki, device, sink.port))
        agent = start_agent(
            process_factory,
            config,
            env={"NOTIFY_SOCKET": agent_sd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        )
        agent_ready = agent_sd.wait_for(lambda n: n.fields.get("READY") == "1")
        assert "backlog 0 events, 0 B" in agent_ready.fields["STATUS"]
        # A change of link state is sent as it happens; the sink counts the connection.
        online = _status(agent_sd, f"uplink online localhost:{sink.port}")
        assert online.fields["STATUS"].endswith("; backlog 0 events, 0 B")
        _status(sink_sd, f"1 connection on :{sink.port}; core queue sqlite up")

        _check_pings(agent_sd, after=agent_ready.at, at_least=5)
        _check_pings(sink_sd, after=agent_ready.at, at_least=5)

        # SIGHUP (systemctl reload): RELOADING=1, then READY=1 again once the reload is done.
        for process, sd in ((agent, agent_sd), (sink, sink_sd)):
            process.signal(signal.SIGHUP)
            reloading = sd.wait_for(lambda n: n.fields.get("RELOADING") == "1")

            def ready_after(n: Notification, after: float = reloading.at) -> bool:
                return n.at > after and n.fields.get("READY") == "1"

            assert sd.wait_for(ready_after).fields["READY"] == "1"

        assert _stop(agent, agent_sd).fields["STATUS"] == "stopping"
        stopping = _stop(sink, sink_sd)
        assert stopping.fields["STATUS"] == "stopping: draining in-flight publishes"
        # Nothing after STOPPING but watchdog pings (systemd ignores STATUS from a stopping unit).
        late = [n.fields for n in sink_sd.received if n.at > stopping.at]
        assert all(fields == {"WATCHDOG": "1"} for fields in late), late


@pytest.mark.integration
@pytest.mark.fault
def test_a_blocked_event_loop_stops_the_watchdog_pings(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    # The 6th tick blocks the event loop itself for 3 s: longer than WATCHDOG_USEC (1 s), so
    # systemd would kill the agent; here the pings resume once the loop runs again.
    with NotifySocket(short_path(tmp_path)) as sd:
        agent = start_agent(
            process_factory,
            write_config(tmp_path / "agent"),
            env={
                "NOTIFY_SOCKET": sd.address,
                "WATCHDOG_USEC": "1000000",
                "BRIDGE_FAILPOINTS": f"{STALL_FAILPOINT}=sleep:3@6",
            },
        )
        deadline = time.monotonic() + 30
        while len(sd.pings()) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        pings = sd.pings()
        assert agent.sigterm(timeout=30) == 0
    between = gaps(pings)
    assert len(pings) >= 10, pings
    stalls = [gap for gap in between if gap > 1.0]
    assert len(stalls) == 1, between
    assert stalls[0] >= 2.8  # the whole block: not one ping got out meanwhile
    assert between.index(stalls[0]) == 4  # between the 5th and the 6th ping
    assert max(between[5:]) < 1.0  # and the loop pings on time again afterwards
