"""bench.drain's reference for (a) and (b): a bare aiomqtt loop publishing the same events, in a
process of its own (``python -m bench.drain _bare SPEC``), as the agent would send them."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import ssl
import time
from pathlib import Path

from bench.child import run_child
from bench.drain_agent import Drain
from bench.drain_config import DEVICE, Pki, agent_toml, batch_format
from bench.drain_processes import Process, make_dir
from bench.load import PAYLOAD_BYTES, payloads, topics
from bench.procfs import cpu_seconds
from mqtt_ingest.envelope import BATCH_FORMATS

__all__ = ["bare_drain", "bare_loop"]


async def bare_drain(
    root: Path, pki: Pki, server: Process, events: int, args: argparse.Namespace, *, batch: bool
) -> Drain:
    """The bare aiomqtt loop (`bare_loop`), in its own process, against ``server``."""
    make_dir(root)
    token = ""
    if batch:
        token = await asyncio.to_thread(_device_token, root, pki, server.port)
    server_cpu = cpu_seconds(server.pid)
    result = await run_child(
        "the bare loop", "bench.drain", "_bare",
        json.dumps({
            "port": server.port, "events": events, "window": args.window,
            "topics": args.topics, "batch": batch, "token": token, "format": batch_format(args),
            "ca": str(pki.ca), "cert": str(pki.device_cert), "key": str(pki.device_key),
        }),
    )  # fmt: skip
    server_cpu = cpu_seconds(server.pid) - server_cpu
    return Drain(events, float(result["seconds"]), float(result["cpu"]), server_cpu)


def _device_token(root: Path, pki: Pki, port: int) -> str:
    """A device-signed JWT, minted by the agent's own code from an agent config."""
    from edge_agent.config import parse_config
    from edge_agent.token import token_source
    from mqtt_ingest.clock import SystemClock

    text = agent_toml(root / "unused", pki, port, raw=False, window=1, durability="full")
    config = parse_config(text)
    assert config.uplink is not None
    value = token_source(config.uplink, DEVICE, SystemClock()).current().value
    assert value is not None
    return value


async def bare_loop(spec: dict[str, object]) -> dict[str, float]:
    """The reference client: ``window`` coroutines share one aiomqtt client, each publishing the
    next message and awaiting its PUBACK (so at most ``window`` are in flight)."""
    import aiomqtt

    from edge_agent.config import UplinkBatch
    from mqtt_ingest.envelope import EnvelopeEvent, encode, format_username

    events, window = int(str(spec["events"])), int(str(spec["window"]))
    names = [f"devices/{DEVICE}/{t}" for t in topics(int(str(spec["topics"])))]
    bodies = payloads()
    messages: list[tuple[str, bytes]] = []
    if spec["batch"]:
        # Runs of consecutive events of one topic, cut like the agent cuts them.
        limits, epoch = UplinkBatch(), secrets.token_hex(8)
        per_envelope = min(limits.max_events, (limits.max_bytes - 64) // (PAYLOAD_BYTES + 24))
        now_ms = int(time.time() * 1000)
        per_topic: list[list[tuple[str, bytes]]] = []
        for t, topic in enumerate(names):
            seqs = list(range(t + 1, events + 1, len(names)))
            per_topic.append([])
            for first in range(0, len(seqs), per_envelope):
                run = [EnvelopeEvent(s, now_ms, bodies[s % len(bodies)]) for s in
                       seqs[first : first + per_envelope]]  # fmt: skip
                version = BATCH_FORMATS[str(spec["format"])]
                per_topic[-1].append((topic, encode(epoch, run, version=version)))
        # Topics interleaved, as the events were buffered.
        messages = [m for group in itertools.zip_longest(*per_topic) for m in group if m]
    else:
        messages = [(names[n % len(names)], bodies[n % len(bodies)]) for n in range(events)]
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(spec["ca"]))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(spec["cert"]), str(spec["key"]))
    token = str(spec["token"]) or None
    client = aiomqtt.Client(
        "localhost",
        int(str(spec["port"])),
        identifier=f"{DEVICE}" if token else "bench-bare",
        username=format_username(DEVICE, format=str(spec["format"])) if token else None,
        password=token,
        tls_context=context,
        keepalive=30,
        timeout=10,
        clean_session=True,
        max_inflight_messages=window,
    )
    client.pending_calls_threshold = window + 1
    cpu = time.process_time()
    async with client:
        queue = iter(messages)
        started = time.perf_counter()

        async def worker() -> None:
            for topic, payload in queue:
                await client.publish(topic, payload, qos=1, timeout=60)

        async with asyncio.TaskGroup() as tasks:
            for _ in range(window):
                tasks.create_task(worker())
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu": time.process_time() - cpu, "messages": len(messages)}
