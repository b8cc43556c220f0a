"""Raw mode against standard brokers (SPEC §3): Mosquitto requiring a client certificate, and
amqtt's broker. A subscriber on the broker sees every event, each with its topic's QoS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from edge_agent import Agent, load_config
from edge_agent.buffer import inspect
from tests.harness.agent import uplink_section, write_config
from tests.harness.amqtt_broker import READY as AMQTT_READY
from tests.harness.mosquitto import MosquittoFactory, free_port
from tests.harness.pki import Pki
from tests.harness.process import ProcessFactory
from tests.harness.report import figures, until
from tests.harness.uplink import TOPICS

pytestmark = pytest.mark.integration

PER_TOPIC = 50
EXPECTED_QOS = {"alarms/door": 2, "bulk/vib": 0, "sensors/t1": 1}


async def publish_all(tmp_path: Path, pki: Pki, port: int, device_id: str) -> None:
    device = pki.device(device_id)
    config = load_config(
        write_config(
            tmp_path / "agent",
            device_id=device.device_id,
            uplink=uplink_section(
                pki, device, port, host="localhost", token='mode = "none"', extra='format = "raw"'
            ),
            topics=TOPICS,
        )
    )
    async with Agent(config) as agent:
        for i in range(PER_TOPIC):
            for topic in EXPECTED_QOS:
                await agent.publish(topic, f"{i}".encode())
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)


def check(received: list[tuple[int, str, bytes]], device_id: str, broker: str) -> None:
    prefix = f"devices/{device_id}/"
    qos_seen = Counter((topic.removeprefix(prefix), qos) for qos, topic, _ in received)
    figures(f"raw mode to {broker}", received=len(received), by_topic_and_qos=dict(qos_seen))
    for topic, qos in EXPECTED_QOS.items():
        payloads = [int(p) for q, t, p in received if t == prefix + topic]
        assert payloads == list(range(PER_TOPIC)), f"{topic}: {payloads[:10]}..."
        assert qos_seen[(topic, qos)] == PER_TOPIC, f"{topic} not received at QoS {qos}"


async def test_raw_mode_to_mosquitto_with_client_certificates(
    tmp_path: Path, pki: Pki, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory(tls=True)
    assert broker.tls_port is not None
    device_id = f"raw-mq-{uuid.uuid4().hex[:6]}"
    total = PER_TOPIC * len(EXPECTED_QOS)
    # The reader subscribes at QoS 2: each message arrives with the QoS it was published with.
    reader = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "2",
        "-t", f"devices/{device_id}/#", "-C", str(total), "-W", "60", "-F", "%q %t %p",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # subscribed before anything is published
    await publish_all(tmp_path, pki, broker.tls_port, device_id)
    out, err = await asyncio.wait_for(reader.communicate(), 60)
    assert reader.returncode == 0, err.decode()
    received = []
    for line in out.decode().splitlines():
        qos, topic, payload = line.split(" ", 2)
        received.append((int(qos), topic, payload.encode()))
    check(received, device_id, "mosquitto")
    assert f"as {device_id}" in broker.log() or device_id in broker.log()


async def test_raw_mode_to_an_amqtt_broker(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    port = free_port()
    broker = process_factory(
        [sys.executable, "-m", "tests.harness.amqtt_broker", "--port", str(port),
         "--ca", str(pki.ca_cert), "--cert", str(pki.server_cert), "--key", str(pki.server_key)],
        ready=AMQTT_READY, name="amqtt-broker", start=False,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    await broker.astart()
    device_id = f"raw-amqtt-{uuid.uuid4().hex[:6]}"
    await publish_all(tmp_path, pki, port, device_id)
    await until(lambda: broker.output().count("received ") >= PER_TOPIC * len(EXPECTED_QOS))
    received = []
    for line in broker.output().splitlines():
        if line.startswith("received "):
            _, qos, topic = line.split(" ", 2)
            received.append((int(qos), topic, b""))
    prefix = f"devices/{device_id}/"
    qos_seen = Counter((topic.removeprefix(prefix), qos) for qos, topic, _ in received)
    figures("raw mode to amqtt", received=len(received), by_topic_and_qos=dict(qos_seen))
    assert qos_seen == dict.fromkeys(EXPECTED_QOS.items(), PER_TOPIC)
