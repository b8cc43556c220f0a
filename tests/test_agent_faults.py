"""Accepted = committed, across crashes of the agent (RELIABILITY F1 buffer side, F19, F20).

Every event whose PUBACK or API return a producer saw must be in the buffer after a ``kill -9``
at a random instant or at a failpoint inside the commit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from edge_agent.buffer import read_events
from tests.harness.agent import start_agent, write_config
from tests.harness.process import ManagedProcess, ProcessFactory

pytestmark = [pytest.mark.fault, pytest.mark.integration]

SEED = int(os.environ.get("BRIDGE_FAULT_SEED", "20261123"))


async def mqtt_producer(port: int, name: str, acked: list[bytes], stop: asyncio.Event) -> None:
    """Publish QoS 1 events until told to stop or the agent goes away; record what was acked."""
    with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
        async with aiomqtt.Client("127.0.0.1", port, identifier=name, timeout=5) as client:
            number = 0
            while not stop.is_set():
                payload = f"{name}-{number}".encode()
                await client.publish(f"sensors/{name}", payload, qos=1, timeout=5)
                acked.append(payload)
                number += 1


def stored_payloads(data_dir: Path) -> set[bytes]:
    return {event.payload for event in read_events(data_dir)}


async def run_producers(
    agent: ManagedProcess, count: int
) -> tuple[list[bytes], asyncio.Event, list[asyncio.Task[None]]]:
    acked: list[bytes] = []
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(mqtt_producer(agent.port, f"p{agent.starts}-{i}", acked, stop))
        for i in range(count)
    ]
    return acked, stop, tasks


async def test_kill9_at_random_instants_loses_no_acked_event(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    rng = random.Random(SEED)
    config = write_config(tmp_path)
    agent = start_agent(process_factory, config)
    all_acked: list[bytes] = []
    for round_number in range(4):
        if round_number:
            await agent.arestart()
        acked, stop, tasks = await run_producers(agent, 6)
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        agent.kill9()
        stop.set()
        await asyncio.gather(*tasks)
        all_acked += acked
        assert acked, f"round {round_number}: nothing was acknowledged before the kill"
    missing = set(all_acked) - stored_payloads(tmp_path / "data")
    assert not missing, f"seed {SEED}: {len(missing)} acked events lost, e.g. {sorted(missing)[:5]}"


def api_producer(config: Path, count: int, failpoints: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    if failpoints:
        env["BRIDGE_FAILPOINTS"] = failpoints
    return subprocess.Popen(
        [sys.executable, "-m", "tests.harness.api_producer", str(config), str(count), "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def acked_lines(output: str) -> dict[bytes, str]:
    found = {}
    for line in output.splitlines():
        if line.startswith("acked "):
            _, payload, event_id = line.split()
            found[payload.encode()] = event_id
    return found


@pytest.mark.parametrize(
    "failpoints",
    [
        None,
        "buffer.before_commit=kill9@7",
        "buffer.after_commit_before_ack=kill9@7",
    ],
    ids=["random-instant", "before-commit", "after-commit-before-ack"],
)
async def test_api_acked_events_survive_kill9(tmp_path: Path, failpoints: str | None) -> None:
    config = write_config(tmp_path)
    producer = await asyncio.to_thread(api_producer, config, 100_000, failpoints)
    try:
        if failpoints is None:
            await asyncio.sleep(random.Random(SEED).uniform(0.8, 1.5))
            producer.send_signal(signal.SIGKILL)
        out, err = await asyncio.to_thread(producer.communicate, timeout=60)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    assert producer.returncode == -signal.SIGKILL, err
    acked = acked_lines(out)
    assert acked, f"nothing acknowledged before the kill: {err[-2000:]}"
    stored = {e.payload: e.seq for e in read_events(tmp_path / "data")}
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acked events lost, e.g. {sorted(missing)[:5]}"
    # The ids the API returned are the ones stored.
    for payload, event_id in acked.items():
        assert event_id.endswith(f"/{stored[payload]}")


async def test_sigterm_under_load_exits_0_and_keeps_every_acked_event(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    config = write_config(tmp_path)
    agent = start_agent(process_factory, config)
    acked, stop, tasks = await run_producers(agent, 6)
    await asyncio.sleep(0.8)
    assert await agent.asigterm() == 0
    stop.set()
    await asyncio.gather(*tasks)
    assert acked
    assert not set(acked) - stored_payloads(tmp_path / "data")
    assert "stopped" in agent.output()


async def test_a_second_agent_on_the_same_directory_refuses_to_start(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    config = write_config(tmp_path)
    first = start_agent(process_factory, config)
    second = process_factory(
        [first.argv[0], "--config", str(config), "run", "--listen-port", "0"],
        ready=r"listener on",
        name="second-agent",
        start=False,
    )
    with pytest.raises(AssertionError, match="exited with 1 before it was ready"):
        await second.astart()
    assert f"another edge-agent (pid {first.pid})" in second.output()
    assert first.running
