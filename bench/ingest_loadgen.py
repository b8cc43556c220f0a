"""The load generator of ``bench.ingest`` (its ``load`` mode): one process that connects
``--clients`` publishers, warms them up, says ``ready``, publishes on ``go`` and says ``done``."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time

from bench.drain_config import HOST
from bench.publisher import Publisher
from bench.report import out
from bench.wire import connect_packet, publish_packet, utf8

TOPIC = "devices/bench/telemetry"
PAYLOAD_BYTES = 200


# -- MQTT packets, built by hand ----------------------------------------------------------------


def _publish_packets(count: int) -> list[bytes]:
    """QoS 1 PUBLISH packets with packet ids 1..count (reused cyclically by every client)."""
    payload = bytes(i % 251 for i in range(PAYLOAD_BYTES))
    topic = utf8(TOPIC)
    return [publish_packet(topic, packet_id, payload) for packet_id in range(1, count + 1)]


# -- the load generator (``load`` mode) ---------------------------------------------------------


def _client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    return context


async def load_main(args: argparse.Namespace) -> None:
    """Connect, warm up, say ``ready``, wait for ``go`` on stdin, publish, say ``done``, then
    stay (so the orchestrator can still read this process's CPU time) until stdin closes."""
    loop = asyncio.get_running_loop()
    context = _client_context(args.ca, args.cert, args.key) if args.ca else None
    packets = _publish_packets(min(65535, max(4096, args.window * 8)))
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    publishers: list[Publisher] = []
    try:
        for index in range(args.clients):
            client_id = f"bench-{args.name}-{index}"
            _, publisher = await loop.create_connection(
                lambda client_id=client_id: Publisher(
                    connect_packet(client_id), packets, args.window, args.refill, client_id
                ),
                HOST,
                args.port,
                ssl=context,
                server_hostname="localhost" if context else None,
            )
            publishers.append(publisher)
            await asyncio.wait_for(publisher.connected, 30)
        if args.warmup:
            await asyncio.gather(*(p.publish(args.warmup) for p in publishers))
        out("ready")
        if (await stdin.readline()).strip() != b"go":
            return
        start = time.perf_counter()
        await asyncio.gather(*(p.publish(args.events) for p in publishers))
        elapsed = time.perf_counter() - start
        out(f"done {args.events * len(publishers)} {elapsed:.6f}")
        await stdin.read()
    except Exception as exc:  # reported to the orchestrator, which shows it
        out(f"error {exc!r}")
    finally:
        for publisher in publishers:
            publisher.close()
        await asyncio.sleep(0.05)
