"""F21: a seeded nemesis mixes faults for minutes against several agents with sensors publishing,
and afterwards every acknowledged event is in the core queue, once, restorable to its order.

Everything is real and in its own process: three ``edge-agent run`` (each its own device, data
directory and mutual-TLS uplink through a chaos proxy), one ``cloud-sink run`` on NATS JetStream
(through a chaos proxy too), NATS itself. Sensors (raw MQTT clients in this process, two per
agent, QoS 1 to the agent's local listener) number their events and record each one whose PUBACK
they saw (`tests.harness.history`). The nemesis, one fault at a time with calm in between:

- F1: kill -9 of the first agent at a random instant, restart on the same data directory;
- F4: kill -9 or SIGTERM of the sink, restart;
- F5: reset, close or blackhole one agent's link;
- F9: the core queue blackholed (slow: no confirmations) or its connections reset (down).

Then every fault is healed, the buffers drain, and the checker compares. The two agents never
killed must keep their open files and RSS flat after the warm-up (a leak per reconnect would
show). The sink, which the nemesis restarts, gets its own test of the same length: one sink
process under reconnecting devices, cut links, core-queue outages and refused clients keeps its
open files and RSS flat. ``SOAK_SECONDS`` (default 60, the CI slice) sets the length,
``SOAK_SEED`` replays a schedule:
``SOAK_SECONDS=900 SOAK_SEED=7 pytest -m slow -s tests/test_soak.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from edge_agent.buffer import DB_NAME, inspect
from tests.harness.agent import start_agent, uplink_section, write_config
from tests.harness.brokers import NatsNames, nats_connection, read_stream
from tests.harness.chaos import ChaosProxy, ChaosProxyFactory
from tests.harness.history import Delivered, History
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ManagedProcess, ProcessFactory, rss_kib
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet
from tests.harness.report import figures, until
from tests.harness.sink import (
    CLOUD_SINK,
    ResendingDevice,
    device_token,
    nats_backend,
    write_sink_config,
)
from tests.harness.uplink import TOPICS

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SEED = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1_000_000))
AGENTS = 3
SENSOR_PAUSE = 0.02  # seconds between a sensor's PUBACK and its next PUBLISH
DRAIN_TIMEOUT = 180.0
CALM = 5.0  # seconds of publishing after the last fault: every sensor must get events through
PUBACK_TIMEOUT = 15.0
# An agent's growth from the warm-up to the end that counts as a leak.
FD_SLACK = 2
RSS_SLACK_KB = 6 * 1024  # measured: +1.4 MB in a 60 s slice (caches filling), +1 MB in 600 s
SINK_DEVICES = 4
SINK_FAULTS = ["reset", "close", "blackhole", "queue down", "queue slow", "refused"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.integration,
    pytest.mark.timeout(SOAK_SECONDS + DRAIN_TIMEOUT + 180),
]


@dataclass
class Rig:
    sink: ManagedProcess
    queue_proxy: ChaosProxy  # sink -> NATS
    agents: list[ManagedProcess]
    links: list[ChaosProxy]  # agent i -> sink
    data_dirs: list[Path]
    devices: list[str]
    faults: Counter[str] = field(default_factory=Counter)
    local_failures: int = 0  # sensor publishes without a PUBACK (agent down, cut)
    last_accepted: dict[str, float] = field(default_factory=dict)  # by sensor, monotonic time


async def sensor(rig: Rig, index: int, topic: str, history: History, stop: asyncio.Event) -> None:
    """Publish numbered events to agent ``index``'s listener, one at a time, QoS 1; record each
    PUBACK seen. A number is never sent twice: one without its PUBACK is simply not accepted."""
    agent, device = rig.agents[index], rig.devices[index]
    client_id = f"{device}-{topic.replace('/', '-')}"
    client: RawClient | None = None
    number = 0
    while not stop.is_set():
        try:
            if client is None:
                client = await RawClient.connected(agent.port, client_id)
            packet_id = number % 65535 + 1
            await client.send(publish_packet(topic, b"%d" % number, qos=1, packet_id=packet_id))
            answer = await client.read(timeout=PUBACK_TIMEOUT)
            if answer is None or (answer.kind, answer.packet_id) != (4, packet_id):
                raise ConnectionError(f"no PUBACK for {number}: {answer}")
            history.accepted(device, topic, number)
            rig.last_accepted[client_id] = time.monotonic()
        except (OSError, TimeoutError, AssertionError, asyncio.IncompleteReadError):
            rig.local_failures += 1
            if client is not None:
                await client.aclose()
                client = None
            await asyncio.sleep(0.2)
        number += 1
        await asyncio.sleep(SENSOR_PAUSE)
    if client is not None:
        await client.aclose()


async def nemesis(rig: Rig, rng: random.Random, until_time: float) -> None:
    """One fault at a time, healed before the next, with calm in between."""

    async def agent_kill9() -> None:
        await asyncio.to_thread(rig.agents[0].kill9)
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        await rig.agents[0].arestart()

    async def sink_kill9() -> None:
        await asyncio.to_thread(rig.sink.kill9)
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        await rig.sink.arestart()

    async def sink_sigterm() -> None:
        assert await rig.sink.asigterm() == 0
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        await rig.sink.arestart()

    def link(kind: str) -> Callable[[], Awaitable[None]]:
        async def cut_one() -> None:
            # Up to beyond 2 x keep-alive (4 s) and publish_timeout (10 s): some cuts are
            # detected as dead links, others heal before anyone notices.
            await cut(rng.choice(rig.links), kind, rng.uniform(0.5, 15.0))

        return cut_one

    async def queue_slow() -> None:
        await cut(rig.queue_proxy, "blackhole", rng.uniform(1.0, 6.0))

    async def queue_down() -> None:
        await cut(rig.queue_proxy, "reset", rng.uniform(1.0, 4.0))

    faults: dict[str, Callable[[], Awaitable[None]]] = {
        "F1 agent kill -9": agent_kill9,
        "F4 sink kill -9": sink_kill9,
        "F4 sink SIGTERM": sink_sigterm,
        "F5 link reset": link("reset"),
        "F5 link close": link("close"),
        "F5 link blackhole": link("blackhole"),
        "F9 core queue slow": queue_slow,
        "F9 core queue down": queue_down,
    }
    names = sorted(faults)
    while time.monotonic() < until_time:
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        name = rng.choice(names)
        rig.faults[name] += 1
        await faults[name]()


async def sink_via_proxy(
    tmp_path: Path, pki: Pki, names: NatsNames, proxies: ChaosProxyFactory, backend_extra: str = ""
) -> tuple[Path, ChaosProxy]:
    """A sink config on NATS JetStream reached through a fresh chaos proxy (2 s timeout), and
    that proxy."""
    nats = urlsplit(names.url)
    proxy = await proxies(nats.hostname or "127.0.0.1", nats.port or 4222)
    proxied = names.url.replace(nats.netloc, f"127.0.0.1:{proxy.port}")
    backend = nats_backend(dataclasses.replace(names, url=proxied))
    config = write_sink_config(tmp_path, pki)
    text = config.read_text()
    backend += backend_extra + 'timeout = "2s"\n'
    config.write_text(text[: text.index("[backend]")] + backend)
    return config, proxy


async def cut(proxy: ChaosProxy, how: str, seconds: float) -> None:
    """Cut the path through ``proxy`` (``reset``, ``close`` or ``blackhole``) for ``seconds``."""
    if how == "reset":
        await proxy.reset()
    elif how == "close":
        await proxy.close()
    else:
        proxy.blackhole()
    await asyncio.sleep(seconds)
    proxy.pass_through()


def footprint(process: ManagedProcess) -> tuple[int, int]:
    """(open files, VmRSS in KiB) of a running process."""
    return len(os.listdir(f"/proc/{process.pid}/fd")), rss_kib(process.pid)


async def delivered(names: NatsNames, devices: list[str]) -> list[Delivered]:
    async with nats_connection(names.url) as nc:
        count = (await nc.jetstream().stream_info(names.stream)).state.messages
    messages = await read_stream(names.url, names.stream, expected=count, timeout=60)
    result = []
    for m in messages:
        device = m.headers["device-id"]
        assert device in devices, m.headers
        result.append(
            Delivered(
                device=device,
                topic=m.headers["topic"].removeprefix(f"devices/{device}/"),
                number=int(m.body),
                seq=int(m.headers["seq"]),
                event_id=m.headers["Nats-Msg-Id"],
            )
        )
    return result


async def test_nemesis_over_agents_sink_links_and_core_queue_loses_nothing(
    tmp_path: Path,
    pki: Pki,
    nats_jetstream: NatsNames,
    process_factory: ProcessFactory,
    chaos_proxy_factory: ChaosProxyFactory,
) -> None:
    figures("F21 soak", seconds=SOAK_SECONDS, seed=SEED)  # first, so a failure can be replayed
    rng = random.Random(SEED)
    sink_port = free_port()
    sink_config, queue_proxy = await sink_via_proxy(
        tmp_path, pki, nats_jetstream, chaos_proxy_factory, 'duplicate_window = "30m"\n'
    )
    sink_config.write_text(sink_config.read_text().replace("port = 0", f"port = {sink_port}"))
    sink = process_factory(
        [CLOUD_SINK, "--config", str(sink_config), "run"],
        ready=r"listening on", name="sink", start=False,
    )  # fmt: skip
    await sink.astart()  # off the loop: the NATS proxy serves on it
    links, agents, data_dirs, devices = [], [], [], []
    for index in range(AGENTS):
        device = pki.device(f"soak{index}-{uuid.uuid4().hex[:6]}")
        link = await chaos_proxy_factory("127.0.0.1", sink_port)
        extra = 'keepalive = 4\npublish_timeout = "10s"\nwindow = 20\nbatch.max_events = 50'
        path = write_config(
            tmp_path / f"agent{index}",
            device_id=device.device_id,
            uplink=uplink_section(pki, device, link.port, extra=extra),
            topics=TOPICS,
        )
        agent = start_agent(process_factory, path, start=False)
        await agent.astart()
        links.append(link)
        agents.append(agent)
        data_dirs.append(path.parent / "data")
        devices.append(device.device_id)
    rig = Rig(sink, queue_proxy, agents, links, data_dirs, devices)
    history = History()
    stop = asyncio.Event()
    sensors = [
        asyncio.create_task(sensor(rig, index, topic, history, stop))
        for index in range(AGENTS)
        for topic in (f"sensors/s{index}", f"alarms/a{index}")  # uplink QoS 1 and QoS 2
    ]
    started = time.monotonic()
    warm_up = SOAK_SECONDS / 4
    chaos = asyncio.create_task(nemesis(rig, rng, started + SOAK_SECONDS))
    await asyncio.sleep(warm_up)
    after_warm_up = {i: footprint(rig.agents[i]) for i in (1, 2)}
    await chaos
    calm_from = time.monotonic()
    await asyncio.sleep(CALM)  # every fault is healed: every sensor must get events through
    stop.set()
    await asyncio.gather(*sensors)
    stuck = [name for name, at in rig.last_accepted.items() if at < calm_from]
    assert len(rig.last_accepted) == len(sensors), "a sensor never got an event through"
    assert not stuck, f"seed {SEED}: no event accepted after the faults: {stuck}"

    # Heal whatever is left, drain, stop everything cleanly.
    queue_proxy.pass_through()
    for link in links:
        link.pass_through()
    drain_started = time.monotonic()
    await until(
        lambda: all(inspect(d).events == 0 for d in data_dirs), timeout=DRAIN_TIMEOUT, every=0.2
    )
    drained_in = time.monotonic() - drain_started
    at_end = {i: footprint(rig.agents[i]) for i in (1, 2)}
    dead_letters = sum(inspect(d).dead_letters for d in data_dirs)
    for agent in agents:
        assert await agent.asigterm() == 0
    assert await sink.asigterm() == 0
    for directory in data_dirs:
        with contextlib.closing(sqlite3.connect(directory / DB_NAME)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], directory

    verdict = history.check(await delivered(nats_jetstream, devices))
    figures(
        f"F21 soak {SOAK_SECONDS:g}s seed {SEED}",
        faults=dict(rig.faults),
        local_failures=rig.local_failures,
        dead_letters=dead_letters,
        drained_in_s=round(drained_in, 1),
        **verdict.figures(),
    )
    figures("F21 footprint (open files, RSS KiB)", after_warm_up=after_warm_up, at_end=at_end)
    assert sum(rig.faults.values()) > 0
    assert verdict.accepted > 0
    assert verdict.lost_count == 0, f"seed {SEED}: lost {verdict.lost}"
    assert verdict.duplicates == 0, f"seed {SEED}"
    assert not verdict.unrestorable, f"seed {SEED}: seq order is not the producers' order"
    assert dead_letters == 0
    for index in (1, 2):
        (fds_before, rss_before), (fds_after, rss_after) = after_warm_up[index], at_end[index]
        assert fds_after <= fds_before + FD_SLACK, f"agent {index}: open files grew"
        assert rss_after <= rss_before + RSS_SLACK_KB, f"agent {index}: RSS grew"


async def probed_footprint(sink: ManagedProcess, pki: Pki, devices: int) -> tuple[int, int]:
    """The sink's (open files, RSS KiB) with ``devices`` fresh, idle device connections: the
    same state at every measurement."""
    clients = []
    for index in range(devices):
        creds = pki.device(f"probe{index}-{uuid.uuid4().hex[:6]}")
        client = await RawClient.open(sink.port, ssl_context=pki.client_context(creds))
        await client.send(connect_as(creds))
        connack = await client.read()
        assert connack is not None
        assert connack.body == b"\x00\x00", connack
        clients.append(client)
    await asyncio.sleep(0.5)  # let the sink settle: nothing in flight
    try:
        return footprint(sink)
    finally:
        for client in clients:
            await client.aclose()


def connect_as(creds: DeviceCreds, token_of: DeviceCreds | None = None) -> bytes:
    """CONNECT as the agent sends it: username = client id = device id, password = a JWT."""
    token = device_token(token_of or creds).encode()
    return connect_packet(creds.device_id, username=creds.device_id, password=token)


async def refused_clients(port: int, pki: Pki) -> Counter[str]:
    """One of each client the sink must turn away: a certificate from another CA, a token for
    another device, a rights violation, a socket that never sends CONNECT."""
    tried: Counter[str] = Counter()
    foreign = pki.foreign_device(f"foreign-{uuid.uuid4().hex[:6]}")
    with contextlib.suppress(OSError):  # TLS 1.2 refuses in the handshake, TLS 1.3 right after
        client = await RawClient.open(port, ssl_context=pki.client_context(foreign))
        try:
            await client.send(connect_as(foreign))
            assert await client.read() is None, "a foreign certificate got an answer"
        finally:
            await client.aclose()
    tried["foreign certificate"] += 1
    me, other = pki.device(f"me-{uuid.uuid4().hex[:6]}"), pki.device(f"ot-{uuid.uuid4().hex[:6]}")
    client = await RawClient.open(port, ssl_context=pki.client_context(me))
    await client.send(connect_as(me, token_of=other))
    connack = await client.read()
    await client.aclose()
    assert connack is not None
    if connack.body[1] == 3:  # server unavailable: the core queue is down, nobody gets in
        tried["refused while the core queue is down"] += 1
    else:
        assert connack.body[1] == 4, connack  # bad user name or password
        tried["other device's token"] += 1
        client = await RawClient.open(port, ssl_context=pki.client_context(me))
        await client.send(connect_as(me))
        assert (await client.read()) is not None
        await client.send(publish_packet(f"devices/{other.device_id}/t", b"x", qos=1, packet_id=1))
        assert await client.closed_within(5), "a rights violation was not disconnected"
        tried["rights violation"] += 1
    idle = await RawClient.open(port, ssl_context=pki.client_context(me))
    assert await idle.closed_within(5 + 2), "an idle socket outlived the CONNECT deadline"
    tried["no CONNECT"] += 1
    return tried


async def test_sink_footprint_is_flat_across_reconnects_outages_and_refusals(
    tmp_path: Path,
    pki: Pki,
    nats_jetstream: NatsNames,
    process_factory: ProcessFactory,
    chaos_proxy_factory: ChaosProxyFactory,
) -> None:
    """F21 for the sink, which the soak above restarts: one process for the whole run."""
    figures("F21 sink footprint", seconds=SOAK_SECONDS, seed=SEED)
    rng = random.Random(SEED)
    config, queue_proxy = await sink_via_proxy(tmp_path, pki, nats_jetstream, chaos_proxy_factory)
    sink = process_factory(
        [CLOUD_SINK, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)", name="sink", start=False,
    )  # fmt: skip
    await sink.astart()  # off the loop: the NATS proxy serves on it
    links = [await chaos_proxy_factory("127.0.0.1", sink.port) for _ in range(SINK_DEVICES)]

    def devices(seconds: float) -> list[ResendingDevice]:
        total = int(seconds / 0.01)
        return [
            ResendingDevice(link.port, pki.device(f"fp{i}-{uuid.uuid4().hex[:6]}"), pki, total)
            for i, link in enumerate(links)
        ]

    # Warm-up: traffic and one round of refusals, no faults.
    warm = devices(SOAK_SECONDS / 4)
    async with asyncio.TaskGroup() as tasks:
        for device in warm:
            tasks.create_task(device.run())
        await refused_clients(sink.port, pki)
    before = await probed_footprint(sink, pki, SINK_DEVICES)

    faults: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    until_time = time.monotonic() + SOAK_SECONDS

    async def nemesis() -> None:
        while time.monotonic() < until_time:
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            kind = rng.choice(SINK_FAULTS)
            faults[kind] += 1
            if kind == "refused":
                refusals.update(await refused_clients(sink.port, pki))
                continue
            if kind.startswith("queue"):
                how = "reset" if kind == "queue down" else "blackhole"
                await cut(queue_proxy, how, rng.uniform(0.5, 4.0))
            else:
                await cut(rng.choice(links), kind, rng.uniform(0.2, 5.0))

    chaotic = devices(SOAK_SECONDS)
    async with asyncio.timeout(SOAK_SECONDS + DRAIN_TIMEOUT), asyncio.TaskGroup() as tasks:
        for device in chaotic:
            tasks.create_task(device.run())
        await nemesis()
    after = await probed_footprint(sink, pki, SINK_DEVICES)
    assert await sink.asigterm() == 0

    # Nothing the sink acknowledged is missing, and nothing is there twice (Nats-Msg-Id).
    everyone = warm + chaotic
    async with nats_connection(nats_jetstream.url) as nc:
        stored = (await nc.jetstream().stream_info(nats_jetstream.stream)).state.messages
    messages = await read_stream(
        nats_jetstream.url, nats_jetstream.stream, expected=stored, timeout=60
    )
    ids = Counter(m.headers["Nats-Msg-Id"] for m in messages)
    acked = {d.event_id(seq) for d in everyone for seq in d.acked}
    figures(
        f"F21 sink footprint {SOAK_SECONDS:g}s seed {SEED}",
        faults=dict(faults),
        refused_clients=dict(refusals),
        reconnects=sum(d.connections for d in chaotic),
        acked=len(acked),
        stored=stored,
        open_files=(before[0], after[0]),
        rss_kib=(before[1], after[1]),
    )
    assert sum(faults.values()) > 0
    assert not acked - ids.keys(), f"seed {SEED}: acknowledged but not stored"
    assert max(ids.values()) == 1, f"seed {SEED}: duplicates"
    assert after[0] <= before[0] + FD_SLACK, f"seed {SEED}: the sink's open files grew"
    assert after[1] <= before[1] + RSS_SLACK_KB, f"seed {SEED}: the sink's RSS grew"
