"""The uplink's bookkeeping across and within connections: a reload while a connection drains,
events set aside as poison suspects and tried again, a CONNACK that never comes. The sink is real
(in this process); faults come from failpoints, the chaos proxy and a slowed authenticator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sink.backends.sqlite import read_dead_letters, read_messages
from edge_agent import Agent, load_config
from edge_agent.buffer import inspect, read_events
from edge_agent.config import AgentConfig
from mqtt_ingest import failpoints
from mqtt_ingest.ports import ConnectRequest, Identity, Refusal
from tests.harness.agent import uplink_section, write_config
from tests.harness.chaos import ChaosProxyFactory, Direction
from tests.harness.clock import SkewedClock
from tests.harness.pki import Pki
from tests.harness.report import figures, until
from tests.harness.sink import AUD
from tests.harness.sink import running_sink as sink
from tests.harness.stages import RecordingStage, running_server
from tests.harness.uplink import (
    acks_held,
    configure,
    issue_token,
    issuer_key,
    issuer_signed_auth,
    new_device,
    preload,
    stored_payloads,
)

pytestmark = [pytest.mark.fault, pytest.mark.integration]


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


async def test_a_reload_that_changes_the_format_does_not_reach_the_open_connection(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """The open connection announced batch-v2 at CONNECT. A reload to raw while its feeder
    lingers for a fuller batch must not turn that batch into raw messages on it (the sink would
    dead-letter them as broken envelopes); the new format starts with the next connection."""
    extra = 'window = 4\nbatch.linger = "1s"\npublish_timeout = "30s"\nkeepalive = 600'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "reformat", extra) as held:
        agent, uplink, proxy = held  # PUBACKs held: the first message stays in flight
        await agent.publish("sensors/t", b"0")
        await until(lambda: uplink.in_flight == 1)
        # One commit of a part-full batch while a message is in flight: the feeder lingers
        # for more. As raw messages these would be more than the window takes.
        await asyncio.gather(*(agent.publish("sensors/t", b"%d" % i) for i in range(1, 9)))
        await asyncio.sleep(0.3)
        uplink.reload(uplink.config.model_copy(update={"format": "raw"}))
        await asyncio.sleep(0.2)
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
        status = uplink.status
    core = tmp_path / "core.db"
    figures("reload to raw while lingering", connections=status.connections)
    assert read_dead_letters(core) == []
    assert sorted(stored_payloads(core)) == list(range(9))
    assert (status.connections, status.failures) == (2, 0)


async def test_every_suspect_is_tried_again_on_one_stable_connection(
    tmp_path: Path, pki: Pki
) -> None:
    """Two events set aside (each lost alone in flight, on two connections) both go again on
    the third connection, one after the other, without waiting for a fourth."""
    device = new_device(pki, "suspects")
    async with sink(tmp_path, pki) as server:
        path = configure(tmp_path, pki, device, server.port, extra='format = "raw"\nwindow = 1')
        config = load_config(path)
        await preload(config, 3)
        # The first two acknowledgements fail their connections with the message alone in flight.
        failpoints.arm("drain.after_publish_before_puback", "raise@1-2")
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
            status = uplink.status
    figures("two suspects", connections=status.connections, failures=status.failures)
    assert (status.connections, status.failures, status.dead_lettered) == (3, 2, 0)
    # Raw mode: the two acknowledged by the sink before the failpoint arrive twice.
    assert sorted(set(stored_payloads(tmp_path / "core.db"))) == [0, 1, 2]


async def test_a_suspect_acknowledged_is_not_sent_again_before_its_row_is_deleted(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A set-aside event may lie after the drain's cursor (here: behind a higher-priority event
    committed later). Once its retry is acknowledged, the next read must skip it even though its
    row is only deleted with the next batch of deletes."""
    extra = 'format = "raw"\nwindow = 1\npublish_timeout = "1s"'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "settling", extra) as held:
        agent, uplink, proxy = held  # its PUBACK never comes back
        await agent.publish("sensors/t", b"0")
        await until(lambda: uplink.status.failures >= 1, timeout=10)  # set aside
        await agent.publish("alarms/a", b"1")  # priority 9: read before it, cursor after it
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
        delivered = uplink.status.delivered
    assert sorted(set(stored_payloads(tmp_path / "core.db"))) == [0, 1]
    assert delivered == 2  # each acknowledged once: nothing sent twice on the last connection


async def test_after_a_connack_timeout_the_next_attempt_connects(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A connect that times out waiting for CONNACK leaves nothing registered with the event
    loop: the next attempt (whose socket may get the same descriptor number) connects."""
    device = new_device(pki, "connack")
    async with sink(tmp_path, pki) as server:
        authenticator = server.authenticator
        authenticate = authenticator.authenticate
        calls = 0

        async def slow_first(request: ConnectRequest) -> Identity | Refusal:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(3)  # the agent gives up at its connect_timeout first
            return await authenticate(request)

        monkeypatch.setattr(authenticator, "authenticate", slow_first)
        extra = 'connect_timeout = "1s"'
        config = load_config(configure(tmp_path, pki, device, server.port, extra=extra))
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with Agent(config) as agent:
                uplink = agent.uplink
                assert uplink is not None
                await agent.publish("sensors/t", b"0")
                await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
                status = uplink.status
    assert "timed out" in status.last_error
    assert (status.failures, status.connections) == (1, 1)
    # Errors only: a slow-callback warning of debug mode (a loaded machine) is no such trace.
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, caplog.text
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"0"]


async def test_qos0_writes_are_no_evidence_against_an_event_the_server_never_acknowledged(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A server that stopped acknowledging (its core queue stalled), QoS 0 telemetry flowing,
    the link cut again and again with the one QoS 1 event alone in flight: that event is not
    poison. paho reports a QoS 0 message published once written, so those writes used to count
    as "others got through" and the healthy event was dead-lettered after max_attempts cuts."""
    device = new_device(pki, "qos0")
    stage = RecordingStage()
    stage.hold()  # nothing is ever acknowledged
    async with running_server(stage, ssl_context=pki.server_context()) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'format = "raw"\nmax_attempts = 2\nkeepalive = 600\npublish_timeout = "60s"'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        data = config.agent.data_dir
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await agent.publish("sensors/t", b"healthy")  # QoS 1
            await until(lambda: uplink.in_flight == 1)
            for cut in range(3):
                failures = uplink.status.failures
                await proxy.reset()  # and new connections too, until pass_through
                await until(lambda f=failures: uplink.status.failures > f)  # type: ignore[misc]
                for i in range(5):
                    await agent.publish("bulk/x", b"%d-%d" % (cut, i))  # QoS 0, while down
                proxy.pass_through()
                # The QoS 0 events go (written: deleted), then the suspect again, alone.
                await until(lambda: inspect(data).events == 1 and uplink.in_flight == 1)
            assert uplink.status.dead_lettered == 0
            stage.release()
            await until(lambda: inspect(data).events == 0, timeout=20)
    assert inspect(data).dead_letters == 0
    assert b"healthy" in stage.payloads()


async def test_a_slow_link_whose_acknowledgements_keep_coming_is_not_timed_out(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """F6: a full window takes longer than ``publish_timeout`` to cross a slow link. While
    acknowledgements keep arriving the link is working: no timeout, nothing sent twice. (The
    timeout used to run from each message's hand-off to paho.)"""
    device = new_device(pki, "slow")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'format = "raw"\npublish_timeout = "1s"\nwindow = 200'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        await preload(config, 150, size=1000)
        proxy.bandwidth(40_000, direction=Direction.UPSTREAM)  # 150 kB: about 4 s
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            status = uplink.status
    figures("slow link, 1 s publish timeout", failures=status.failures, last=status.last_error)
    assert status.failures == 0, status.last_error
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(150))


async def test_a_buffer_error_on_the_drain_path_reconnects_and_the_agent_keeps_accepting(
    tmp_path: Path, pki: Pki
) -> None:
    """A read of the drain failing (a flaky SD card) used to end the uplink task and with it
    the whole agent, its local listener included."""
    device = new_device(pki, "readerr")
    async with sink(tmp_path, pki) as server:
        config = load_config(configure(tmp_path, pki, device, server.port))
        await preload(config, 5)
        failpoints.arm("buffer.read", "raise@2")
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: uplink.status.failures >= 1)
            assert "internal error" in uplink.status.last_error
            await agent.publish("sensors/t", b"5")  # still accepting
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(6))


async def test_the_token_is_renewed_while_a_long_page_is_being_sent(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A page (800 events of 1 kB: four windows) takes ~20 s to queue on a 40 kB/s link, longer
    than ``renew_before`` allows: the renewal happens on time (between two messages), not once
    the page is queued, by which time the sink may have cut the connection at ``exp``."""
    device = new_device(pki, "renew")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'format = "raw"\nwindow = 200'  # a raw page: 4 windows; window_bytes 1 MiB
        token = f'audience = "{AUD}"\nlifetime = "6s"\nrenew_before = "4s"'  # renew after ~2 s
        path = configure(tmp_path, pki, device, proxy.port, extra=extra, token=token)
        config = load_config(path)
        await preload(config, 1000, size=1000)
        proxy.bandwidth(40_000, direction=Direction.UPSTREAM)
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: uplink.status.connections >= 2, timeout=40)
            left = inspect(config.agent.data_dir).events
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
    figures("renewal during a page", events_left_at_renewal=left)
    # Renewed only once the page was queued, at least 600 of it would have been acknowledged.
    assert left > 500, "the renewal waited for the page to be queued"
    assert sorted(set(stored_payloads(tmp_path / "core.db"))) == list(range(1000))


async def test_a_token_file_not_yet_renewed_does_not_hold_back_the_rest_of_a_page(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """At renewal time with the file's token unchanged the connection goes on: the rest of the
    page must go on it too (it was skipped, held back until the next connection)."""
    device = new_device(pki, "skip")
    private, public = issuer_key(tmp_path)
    token_path = tmp_path / "device.jwt"
    token_path.write_text(issue_token(device, private, ttl=200))  # < renew_before (300 s)
    async with sink(tmp_path, pki, extra_auth=issuer_signed_auth(public)) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        token = f'mode = "token-file"\nfile = "{token_path}"'
        path = configure(
            tmp_path, pki, device, proxy.port, extra='format = "raw"\nwindow = 64', token=token
        )
        config = load_config(path)
        await preload(config, 300, size=1000)
        proxy.bandwidth(20_000, direction=Direction.UPSTREAM)  # renewal due ~1 s in, mid-page
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            status = uplink.status
    assert (status.connections, status.failures) == (1, 0)
    assert stored_payloads(tmp_path / "core.db") == list(range(300))  # in order, once


async def test_high_priority_events_beyond_window_bytes_all_go_before_the_backlog(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """Alarms committed behind the drain's cursor, more of them than one read's byte budget:
    every one goes before the rest of the backlog (only the first budget's worth did)."""
    device = new_device(pki, "preempt")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'format = "raw"\nwindow = 4\nwindow_bytes = 4000'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        data = config.agent.data_dir
        await preload(config, 200, size=1000)  # priority 0
        proxy.bandwidth(40_000, direction=Direction.UPSTREAM)
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: uplink.status.delivered >= 20, timeout=20)
            for i in range(20):
                await agent.publish("alarms/a", b"%d" % (1000 + i) + b" " * 996)  # priority 9
            await until(lambda: all(e.topic != "alarms/a" for e in read_events(data)), timeout=30)
            backlog_left = inspect(data).events
            proxy.pass_through()
            await until(lambda: inspect(data).events == 0, timeout=30)
    figures("alarms beyond window_bytes", backlog_left_when_alarms_done=backlog_left)
    assert backlog_left > 100  # the alarms went first, the backlog waited


def _ttl_config(tmp_path: Path, pki: Pki, prefix: str, port: int) -> AgentConfig:
    """An agent through ``port`` whose events expire after an hour (of its clock)."""
    device = new_device(pki, prefix)
    extra = 'format = "raw"\nkeepalive = 600\npublish_timeout = "60s"\nconnect_timeout = "2s"'
    path = write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, port, extra=extra),
        topics='[[topics]]\nfilter = "#"\nqos = 1\nttl = "1h"\n',
    )
    return load_config(path)


async def test_an_event_set_aside_is_not_expired_while_its_retry_is_in_flight(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """An event set aside (lost alone in flight) is tried again from its copy in memory, not
    read with ``hold``: the TTL sweep deleted its row and counted it as expired while the retry
    waited for its PUBACK, which then came: delivered and counted as dropped (a phantom drop,
    SPEC P4). The sink's stage holds the retry while the agent's clock passes the TTL and a
    sweep runs."""
    stage = RecordingStage()
    stage.hold()  # no PUBACK until `release`
    clock = SkewedClock(0)
    async with running_server(stage, ssl_context=pki.server_context()) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        config = _ttl_config(tmp_path, pki, "probettl", proxy.port)
        data = config.agent.data_dir
        async with Agent(config, clock=clock) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await agent.publish("sensors/t", b"probe")
            await until(lambda: uplink.in_flight == 1)
            await proxy.reset()  # lost alone in flight: set aside
            await until(lambda: uplink.status.failures >= 1)
            proxy.pass_through()
            # The next connection has nothing else to send: the event goes again, alone.
            await until(lambda: uplink.status.connections >= 2 and uplink.in_flight == 1)
            [event] = read_events(data)
            assert event.seq in uplink.suspects.seqs  # the retry of the event set aside
            clock.offset = 2 * 3600  # its TTL has passed
            swept = await agent.buffer.sweep_expired()
            stage.release()
            await until(lambda: uplink.status.delivered == 1, timeout=20)  # its PUBACK
            await until(lambda: inspect(data).events == 0)
        drops = inspect(data).drops
    assert (swept, drops) == (0, {})  # delivered: not also counted as expired
    assert b"probe" in stage.payloads()


async def test_events_acknowledged_whose_delete_failed_are_not_expired(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """F7: acknowledged rows cannot be deleted (a full disk), in the delete loop (which ends the
    connection) nor at the connection's end. Delivered, they must never count as expired: they
    were released with the rest and the sweep counted them as dropped (SPEC P4). They stay held
    until a delete succeeds, and are not sent again."""
    stage = RecordingStage()
    clock = SkewedClock(0)
    async with running_server(stage, ssl_context=pki.server_context()) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        config = _ttl_config(tmp_path, pki, "undeleted", proxy.port)
        data = config.agent.data_dir
        async with Agent(config, clock=clock) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: uplink.status.connected_since is not None)
            failpoints.arm("buffer.delete", "raise")
            await agent.publish_many([("sensors/t", b"0"), ("sensors/t", b"1")])
            await until(lambda: uplink.status.delivered == 2)
            proxy.blackhole()  # no new connection gets through (to read the rows again)
            await until(lambda: uplink.status.failures >= 1)  # the failed delete ended it
            assert "cannot delete delivered events" in uplink.status.last_error
            assert inspect(data).events == 2
            clock.offset = 2 * 3600  # their TTL has passed
            swept = await agent.buffer.sweep_expired()
            failpoints.disarm_all()
            proxy.pass_through()
            await until(lambda: inspect(data).events == 0, timeout=30)
        drops = inspect(data).drops
    assert (swept, drops) == (0, {})
    assert sorted(stage.payloads()) == [b"0", b"1"]  # each once: not sent again


@pytest.mark.parametrize("format_", ["raw", "batch-v2", "batch-v1"])
async def test_messages_lost_once_go_again_in_doubling_rounds_not_one_at_a_time(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, format_: str
) -> None:
    """A cut with a full window in flight gave each of its events an attempt, and the next
    connection sent them one message at a time, a round trip each (on a 300 ms cellular link,
    30 s for a window of 100 before the backlog moved again). They go in rounds of 1, 2, 4...
    now: the first alone (a poison event is still set aside at once), the rest within a few
    round trips."""
    extra = (
        f'format = "{format_}"\nwindow = 16\nbatch.max_events = 1\npublish_timeout = "30s"\n'
        "keepalive = 600"
    )
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "rounds", extra) as held:
        agent, uplink, proxy = held  # PUBACKs held: the whole window stays in flight
        await asyncio.gather(*(agent.publish("sensors/t", b"%d" % i) for i in range(16)))
        # (PUBACKs may cross before the blackhole: the proxy's read under way completes. Rounds
        # of 1, 2 and 4 need 7 messages in flight at the cut for the third to be seen.)
        await until(lambda: uplink.in_flight + uplink.status.delivered == 16)
        assert uplink.in_flight >= 7
        await proxy.reset()  # lost with a full window in flight: one attempt each
        data = agent.config.agent.data_dir
        await until(lambda: {e.attempts for e in read_events(data)} == {1})
        proxy.pass_through()
        proxy.latency(0.2, direction=Direction.DOWNSTREAM)  # each round takes a round trip
        peaks: list[int] = []

        def rounds_seen() -> bool:
            if not peaks or uplink.in_flight != peaks[-1]:
                peaks.append(uplink.in_flight)
            return inspect(data).events == 0

        await until(rounds_seen, timeout=30, every=0.01)
        status = uplink.status
    figures(f"rounds after a cut ({format_})", in_flight_seen=peaks)
    assert max(peaks) >= 4  # one at a time, the most ever in flight was 1
    assert status.dead_lettered == 0
    assert sorted(set(stored_payloads(tmp_path / "core.db"))) == list(range(16))
