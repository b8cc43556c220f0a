"""The readiness endpoint for load balancers (SPEC §7): /healthz, /readyz, and 503 while draining.
(503 during a core-queue outage is checked by the outage tests, test_sink_outage.py.)"""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import aiomqtt
import pytest

from cloud_sink.config import parse_config
from cloud_sink.service import Sink
from mqtt_ingest import failpoints
from tests.harness.pki import Pki
from tests.harness.process import ProcessFactory
from tests.harness.rawmqtt import RawClient
from tests.harness.report import until
from tests.harness.sink import CLOUD_SINK, device_token, http_get, write_sink_config

HEALTH = '\n[health]\nhost = "127.0.0.1"\nport = 0\n'


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path, method)


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_endpoints_of_a_running_sink(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    config = write_sink_config(tmp_path, pki)
    config.write_text(config.read_text() + HEALTH)
    sink = process_factory(
        [CLOUD_SINK, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"cloud-sink ready: listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
    )
    found = re.search(r"readiness endpoint at http://127\.0\.0\.1:(\d+)/readyz", sink.output())
    assert found is not None, sink.output()
    port = int(found.group(1))
    assert port != sink.port
    assert await get(port, "/healthz") == (200, "ok\n")
    assert await get(port, "/readyz") == (200, "ready\n")
    assert await get(port, "/readyz?verbose=1") == (200, "ready\n")
    assert await get(port, "/readyz", "HEAD") == (200, "")
    assert await get(port, "/readyz", "POST") == (405, "method not allowed\n")
    assert await get(port, "/metrics") == (404, "not found\n")
    assert (await raw_request(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    # A client that sends half a request is answered 400 after the request deadline, not held.
    assert (await raw_request(port, b"GET /readyz HTTP/1.1\r\n")).startswith(b"HTTP/1.1 400 ")
    assert await sink.asigterm() == 0


async def test_readyz_is_503_while_sigterm_drains(tmp_path: Path, pki: Pki) -> None:
    config = parse_config(write_sink_config(tmp_path, pki).read_text() + HEALTH)
    device = pki.device(f"ready-{uuid.uuid4().hex[:6]}")
    failpoints.arm("ingest.before_store", "sleep:2")  # keeps one event in flight for 2 s
    try:
        async with Sink(config) as sink:
            assert await get(sink.health_port, "/readyz") == (200, "ready\n")
            async with aiomqtt.Client(
                "localhost", sink.port, identifier=device.device_id,
                username=device.device_id, password=device_token(device),
                tls_context=pki.client_context(device), timeout=10,
            ) as client:  # fmt: skip
                publish = asyncio.create_task(
                    client.publish(f"devices/{device.device_id}/t", b"in flight", qos=1)
                )
                await asyncio.sleep(0.3)  # the event is with the (sleeping) stage now
                stopping = asyncio.create_task(sink.stop())
                await asyncio.sleep(0.1)
                assert await get(sink.health_port, "/readyz") == (503, "not ready: draining\n")
                assert (await get(sink.health_port, "/healthz"))[0] == 200
                await asyncio.wait_for(publish, 10)  # drained: stored and acknowledged
                await asyncio.wait_for(stopping, 15)
    finally:
        failpoints.disarm_all()
    assert sink.metrics.get("events_acked") == 1


async def test_readyz_is_503_while_the_sink_is_full(tmp_path: Path, pki: Pki) -> None:
    """Found by review: at max_connections every new connection is reset at once, and /readyz
    said ready: a load balancer kept sending devices to the full instance. Ready again once
    one leaves (below 95% of the limit, here 2: at 1)."""
    text = write_sink_config(tmp_path, pki).read_text() + HEALTH
    config = parse_config(text.replace("[listener]\n", "[listener]\nmax_connections = 2\n"))
    devices = [pki.device(f"full-{n}-{uuid.uuid4().hex[:6]}") for n in range(3)]
    async with Sink(config) as sink:
        clients = [
            await RawClient.open(sink.port, ssl_context=pki.client_context(d)) for d in devices[:2]
        ]
        await until(lambda: sink.server.connection_count == 2)
        assert await get(sink.health_port, "/readyz") == (
            503,
            "not ready: full: 2 connections, max_connections 2\n",
        )

        async def third() -> None:
            client = await RawClient.open(sink.port, ssl_context=pki.client_context(devices[2]))
            await client.read(timeout=5)

        with pytest.raises(ConnectionResetError):  # as the load balancer was told
            await third()
        await clients.pop().aclose()
        await until(lambda: sink.server.connection_count == 1)
        assert await get(sink.health_port, "/readyz") == (200, "ready\n")
        for client in clients:
            await client.aclose()
