"""The uplink's back-off after failed connections: a sink stopping (or closing without a word)
during our CONNECT is a transient failure, not a certificate refusal with its slow back-off, and
only a connection that was up resets the back-off. The sink is real (in this process); a stalled
authenticator and the chaos proxy make the faults."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent.buffer import inspect
from edge_agent.link import REFUSAL_WINDOW, LinkFailure, LinkState
from mqtt_ingest import ConnectRequest, Identity, Refusal
from tests.harness.chaos import ChaosProxyFactory
from tests.harness.mosquitto import free_port
from tests.harness.pki import Pki
from tests.harness.report import until
from tests.harness.sink import running_sink as sink
from tests.harness.uplink import configure, new_device

pytestmark = [pytest.mark.fault, pytest.mark.integration]


@pytest.mark.parametrize("how", ["sink stops", "silent close, late"])
async def test_a_sink_stopping_during_our_connect_is_not_a_certificate_refusal(
    tmp_path: Path, pki: Pki, how: str
) -> None:
    """A sink stopped (or restarted) while it handled our CONNECT closed the connection without
    a byte: that was read as a refusal of our certificate, and the agent waited out the slow
    back-off of refusals (30 s to 15 min) with `status` saying "refused". Our sink now answers
    CONNACK 3 "server unavailable" when it stops then; and a silent close later than
    `REFUSAL_WINDOW` after the handshake (another server; here an authenticator that fails, an
    internal error) is a transient failure too."""
    device = new_device(pki, "restart")
    port = free_port()
    config = load_config(configure(tmp_path, pki, device, port))
    async with Agent(config) as agent:
        assert agent.uplink is not None
        uplink = agent.uplink
        # What the uplink made of each failure: its state alone is a race (a short back-off,
        # full jitter, is over and the next attempt CONNECTING by the time a test looks).
        judged: list[LinkFailure] = []
        back_off = uplink._back_off

        async def judging(failure: LinkFailure) -> None:
            judged.append(failure)
            await back_off(failure)

        uplink._back_off = judging  # type: ignore[method-assign]
        await agent.publish("sensors/t", b"0")
        async with sink(tmp_path, pki, port=port) as server:
            entered = asyncio.Event()

            async def stalled(request: ConnectRequest) -> Identity | Refusal:
                entered.set()
                if how == "sink stops":
                    await asyncio.sleep(3600)  # the sink stops while it is here
                await asyncio.sleep(REFUSAL_WINDOW + 0.5)
                raise RuntimeError("closes the connection without a CONNACK")

            server.authenticator.authenticate = stalled  # type: ignore[method-assign]
            await entered.wait()
            failures = uplink.status.failures  # refused connections before the sink was up
            seen = len(judged)
            if how == "silent close, late":
                await until(lambda: uplink.status.failures > failures, timeout=20)
        await until(lambda: uplink.status.failures > failures, timeout=20)
        after = judged[seen:]
        assert after, judged
        assert not any(failure.refused for failure in after), [f.detail for f in after]
        assert uplink.status.state is not LinkState.REFUSED, uplink.status.last_error
        if how == "sink stops":  # our sink says why
            assert "Server unavailable" in after[0].detail, after[0].detail
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"0"]


async def test_only_a_connection_that_was_up_resets_the_back_off(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """``stable_after`` was timed from the start of the attempt: connects that each failed after
    their whole ``connect_timeout`` (as long as ``stable_after`` here) reset the back-off every
    time, and the agent hammered a sink that never answered at the initial delay."""
    device = new_device(pki, "stable")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        proxy.blackhole()  # accepted, never answered
        extra = 'connect_timeout = "1s"\nstable_after = "1s"'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.failures >= 3, timeout=30)
            assert uplink._backoff.failures >= 3  # growing, not started over at each attempt
            proxy.pass_through()
            await until(lambda: uplink.status.connected_since is not None, timeout=30)
