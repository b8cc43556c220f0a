"""Clock skew and token expiry (RELIABILITY F11): a device clock off by more than the JWT leeway
is refused, said once, and the agent buffers on until the clock is right; within the leeway it
connects. The connection is renewed with a fresh token before the sink would cut it at ``exp``,
with a clock behind too. The skewed clock is ``tests/harness/clock.py``; the sink is real (in
this process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent import Agent, load_config
from edge_agent.buffer import inspect
from edge_agent.link import LinkState
from tests.harness.clock import SkewedClock
from tests.harness.pki import Pki
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink
from tests.harness.stages import counters
from tests.harness.uplink import configure, link, new_device, stored_payloads

pytestmark = [pytest.mark.fault, pytest.mark.integration]


@pytest.mark.parametrize(
    ("skew", "refused_by"),
    [(600, "sink"), (63, "sink"), (57, None), (-57, None), (-63, "sink"), (-600, "agent")],
    ids=["+10min", "+63s", "+57s", "-57s", "-63s", "-10min"],
)
async def test_clock_skew_against_the_leeway(
    tmp_path: Path,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    skew: int,
    refused_by: str | None,
) -> None:
    """RELIABILITY F11 with a 60 s leeway (JWT times are whole seconds: 61 s is on the rounding
    edge, so 63 and 57). A clock ahead by more mints tokens "issued in the future", one behind
    by more tokens issued too long ago for a token minted for this CONNECT: the sink refuses
    them (accepted, a clock behind would have its connections cut at exp before it renews). A
    clock 10 minutes behind finds its new certificate not valid yet (bridge-certs backdates by
    5 minutes) and does not even try. Either way: said once however often retried, the agent
    buffering on, and all delivered once the clock is right. Within the leeway: accepted."""
    device = new_device(pki, "f11")
    clock = SkewedClock(skew)
    async with sink(tmp_path, pki, extra_auth='leeway = "60s"') as server:
        config = load_config(configure(tmp_path, pki, device, server.port))
        async with Agent(config, clock=clock) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            for i in range(5):
                await agent.publish("sensors/t", f"{i}".encode())
            if refused_by is not None:
                # Retried (slowly), and said to be refused between attempts: with full jitter
                # the next attempt (CONNECTING) may start at once, so wait for both.
                await until(
                    lambda: status.failures >= 3 and link(config) is LinkState.REFUSED, timeout=30
                )
                await agent.publish("sensors/t", b"5")  # still accepted: the buffer takes it
                assert inspect(config.agent.data_dir).events == 6
                said = [r for r in caplog.records if "uplink: refused" in r.getMessage()]
                assert len(said) == 1, [r.getMessage() for r in said]
                clock.offset = 0  # the clock is put right
            else:
                await agent.publish("sensors/t", b"5")
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            failures = status.failures
        refusals = counters(server).get("connections_refused")
    figures(f"clock skew {skew:+d} s", sink_refusals=refusals, agent_failures=failures)
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(6))
    assert (refusals > 0) is (refused_by == "sink")
    assert (failures > 0) is (refused_by is not None)


async def test_connection_renewed_before_the_token_expires(tmp_path: Path, pki: Pki) -> None:
    """Short tokens: the agent reconnects with a fresh one before the sink would cut it."""
    device = new_device(pki, "renew")
    async with sink(tmp_path, pki, extra_auth='leeway = "1s"') as server:
        config = load_config(
            configure(
                tmp_path,
                pki,
                device,
                server.port,
                token='audience = "sink.test"\nlifetime = "4s"\nrenew_before = "2s"',
            )
        )
        sent = 0
        async with Agent(config) as agent:
            end = asyncio.get_running_loop().time() + 9
            while asyncio.get_running_loop().time() < end:
                await agent.publish("sensors/t", f"{sent}".encode())
                sent += 1
                await asyncio.sleep(0.01)
            await until(lambda: inspect(config.agent.data_dir).events == 0)
            assert agent.uplink is not None
            connections = agent.uplink.status.connections
        expired = counters(server).get("connections_closed", "expired")
    figures("token renewal", events=sent, connections=connections, closed_by_sink_at_exp=expired)
    assert connections >= 3
    assert expired == 0
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(sent))


@pytest.mark.parametrize("behind", [1, 7])
async def test_a_clock_behind_is_never_cut_at_exp_before_it_renews(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, behind: int
) -> None:
    """RELIABILITY F11 "mid-session expiry: the agent renews first", scaled down: lifetime 8 s,
    renew_before 3 s, leeway 3 s. The agent renews at exp - 3 s on its clock, the sink closes at
    exp + 3 s on its own: a clock more than 6 s behind (at 1 h / 5 min / 30 s: 330 s) was
    accepted and cut at exp every time. Within the leeway (1 s behind) it connects and renews
    before the sink's close; beyond it (7 s) the sink refuses the CONNECT, saying the device
    clock is behind, and the agent keeps buffering; all is delivered once the clock is right."""
    device = new_device(pki, "skewren")
    clock = SkewedClock(-behind)
    async with sink(tmp_path, pki, extra_auth='leeway = "3s"') as server:
        config = load_config(
            configure(
                tmp_path, pki, device, server.port,
                token='audience = "sink.test"\nlifetime = "8s"\nrenew_before = "3s"',
            )
        )  # fmt: skip
        sent = 0
        async with Agent(config, clock=clock) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            end = asyncio.get_running_loop().time() + 12
            while asyncio.get_running_loop().time() < end:
                await agent.publish("sensors/t", f"{sent}".encode())
                sent += 1
                await asyncio.sleep(0.01)
            if behind > 3:
                assert status.connections == 0
                assert status.state in (LinkState.REFUSED, LinkState.CONNECTING)
                assert inspect(config.agent.data_dir).events == sent  # buffered, all of it
                clock.offset = 0  # the clock is put right
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            connections = status.connections
        expired = counters(server).get("connections_closed", "expired")
        refused = counters(server).get("connections_refused", "token issued too long ago")
    figures(
        f"clock {behind} s behind, renewal", events=sent, connections=connections,
        closed_by_sink_at_exp=expired, refused_for_the_clock=refused,
    )  # fmt: skip
    assert expired == 0, "the sink cut the connection at exp before the agent renewed"
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(sent))
    if behind > 3:
        assert refused > 0
        assert "the device clock is behind?" in caplog.text
    else:
        assert connections >= 2  # renewed
        assert refused == 0
