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
from edge_agent.buffer import inspect
from mqtt_ingest import failpoints
from mqtt_ingest.ports import ConnectRequest, Identity, Refusal
from tests.harness.chaos import ChaosProxyFactory
from tests.harness.pki import Pki
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink
from tests.test_uplink_faults import acks_held, configure, new_device, preload, stored_payloads

pytestmark = [pytest.mark.fault, pytest.mark.integration]


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


async def test_a_reload_that_changes_the_format_does_not_reach_the_open_connection(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """The open connection announced batch-v1 at CONNECT. A reload to raw while its feeder
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
        authenticator = server._authenticator
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
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"0"]
