"""The load generator of ``bench.sink``: devices (a certificate and an ES256 JWT each), the
PUBLISH packets (raw events and batch-v2 envelopes), the ``_load`` process that connects the
devices and publishes on command, and `LoadGen`, which drives that process over its stdin."""

from __future__ import annotations

import asyncio
import json
import resource
import secrets
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.drain_config import HOST, Pki
from bench.drain_processes import make_dir
from bench.publisher import Publisher
from bench.report import out
from bench.wire import connect_packet, publish_packet, utf8

if TYPE_CHECKING:
    from certs import CertificateAuthority, Issued

REPO_ROOT = Path(__file__).resolve().parents[1]
AUDIENCE = "bench-sink"
PAYLOAD_BYTES = 200


# -- PKI, tokens, packets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    device_id: str
    cert: str
    key: str
    token: str


def make_pki(directory: Path, devices: int, prefix: str) -> tuple[Pki, list[Device]]:
    """A CA, a server certificate for localhost/127.0.0.1 and ``devices`` device certificates
    with a device-signed JWT each (ES256, ``sub`` = device id, 50 minutes)."""
    import jwt

    from certs import CertificateAuthority

    ca = CertificateAuthority.create(directory / "ca", common_name="Bench CA")
    server = ca.issue_server(["localhost"], ["127.0.0.1"])
    issued = issue_devices(ca, directory, [f"{prefix}{n}" for n in range(devices)])
    now = int(time.time())
    result = []
    for device_id, item in issued:
        from certs import load_private_key

        claims = {"sub": device_id, "aud": AUDIENCE, "iat": now, "exp": now + 3000}
        token = jwt.encode(claims, load_private_key(item.key_path), algorithm="ES256")
        result.append(Device(device_id, str(item.cert_path), str(item.key_path), token))
    first = issued[0][1]
    pki = Pki(ca.cert_path, server.cert_path, server.key_path, first.cert_path, first.key_path)
    return pki, result


def issue_devices(
    ca: CertificateAuthority, directory: Path, names: Sequence[str]
) -> list[tuple[str, Issued]]:
    """Device certificates from ``ca``, 200 per index directory: `issue_device` rewrites its
    whole ``index.json`` per certificate, quadratic for thousands of them."""
    from certs import CertificateAuthority

    issued: list[tuple[str, Issued]] = []
    for first in range(0, len(names), 200):
        view = CertificateAuthority(
            make_dir(directory / f"devices-{first // 200}"), ca.certificate, ca.key
        )
        issued += [(name, view.issue_device(name)) for name in names[first : first + 200]]
    return issued


def payload(n: int) -> bytes:
    return bytes((n * 7 + i) % 251 for i in range(PAYLOAD_BYTES))


ENVELOPE_FORMAT = "batch-v2"  # the agent's default


def envelope_packets(
    topic: str, messages: int, per_envelope: int, first_id: int = 1
) -> list[bytes]:
    """``messages`` PUBLISH packets, each an `ENVELOPE_FORMAT` envelope of ``per_envelope``
    events with seqs that never repeat (every event id is new to the backend)."""
    from mqtt_ingest.envelope import BATCH_FORMATS, EnvelopeEvent, encode

    epoch, name, now_ms = secrets.token_hex(8), utf8(topic), int(time.time() * 1000)
    bodies = [payload(n) for n in range(16)]
    packets = []
    for m in range(messages):
        first = m * per_envelope + 1
        events = [
            EnvelopeEvent(s, now_ms, bodies[s % 16]) for s in range(first, first + per_envelope)
        ]
        packets.append(
            publish_packet(
                name,
                (first_id + m - 1) % 65535 + 1,
                encode(epoch, events, version=BATCH_FORMATS[ENVELOPE_FORMAT]),
            )
        )
    return packets


# -- the load generator (``_load``) ---------------------------------------------------------------


async def load_main(spec: dict[str, object]) -> None:
    """Connect every device, warm up, say ``ready``; then on stdin: ``go`` (publish, say ``done
    EVENTS SECONDS``), ``status`` (say ``status ALIVE LOST PONGS``); EOF: disconnect, exit."""
    raise_nofile()
    loop = asyncio.get_running_loop()
    listed = Path(str(spec["devices"])).read_text()  # noqa: ASYNC240  # before any I/O starts
    devices = [Device(**d) for d in json.loads(listed)]
    port, fmt, window = int(str(spec["port"])), str(spec["format"]), int(str(spec["window"]))
    messages, warmup = int(str(spec["messages"])), int(str(spec["warmup"]))
    per_envelope, keep_alive = int(str(spec["per_envelope"])), int(str(spec["keep_alive"]))
    publishers: list[Publisher] = []
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    gate = asyncio.Semaphore(int(str(spec.get("concurrency", 64))))
    bodies = [payload(n) for n in range(16)]
    started = time.perf_counter()

    async def connect(device: Device) -> Publisher:
        topic = f"devices/{device.device_id}/telemetry"
        if fmt == "raw":
            name = utf8(topic)
            count = min(4096, warmup + messages)  # ids cycle; more than any window
            packets = [publish_packet(name, i, bodies[i % 16]) for i in range(1, count + 1)]
        else:
            # Mosquitto does not decode envelopes: a few, sent again and again, will do there.
            unique = min(64, warmup + messages) if spec.get("cyclic") else warmup + messages
            packets = envelope_packets(topic, unique, per_envelope)
        username = (
            f"{device.device_id}?format={ENVELOPE_FORMAT}" if fmt == "batch" else device.device_id
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(spec["ca"]))
        context.load_cert_chain(device.cert, device.key)
        hello = connect_packet(
            device.device_id, keep_alive, username=username, password=device.token
        )
        async with gate:
            _, publisher = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Publisher(hello, packets, window, name=device.device_id),
                    HOST,
                    port,
                    ssl=context,
                    server_hostname="localhost",
                ),
                60,
            )
            await asyncio.wait_for(publisher.connected, 60)
        return publisher

    try:
        async with asyncio.TaskGroup() as tasks:
            pending = [tasks.create_task(connect(d)) for d in devices]
        publishers = [task.result() for task in pending]
        connect_seconds = time.perf_counter() - started
        if warmup:
            await asyncio.gather(*(p.publish(warmup) for p in publishers))
        out(f"ready {connect_seconds:.3f}")
        events_per_message = per_envelope if fmt == "batch" else 1
        pinger: asyncio.Task[None] | None = None
        if spec.get("ping"):

            async def ping() -> None:
                while True:
                    await asyncio.sleep(keep_alive / 2)
                    for publisher in publishers:
                        publisher.ping()

            pinger = asyncio.create_task(ping())
        while line := (await stdin.readline()).strip():
            if line == b"go":
                begin = time.perf_counter()
                await asyncio.gather(*(p.publish(messages) for p in publishers))
                seconds = time.perf_counter() - begin
                out(f"done {messages * events_per_message * len(publishers)} {seconds:.6f}")
            elif line == b"status":
                lost = [p for p in publishers if p.lost is not None]
                pongs = sum(p.pongs for p in publishers)
                alive = len(publishers) - len(lost)
                out(f"status {alive} {len(lost)} {pongs}")
        if pinger is not None:
            pinger.cancel()
    except Exception as exc:  # reported to the orchestrator, which shows it
        out(f"error {exc!r}")
    finally:
        for publisher in publishers:
            publisher.close()
        await asyncio.sleep(0.1)


def raise_nofile() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class LoadGen:
    """The ``_load`` process, driven line by line over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, spec: dict[str, object], within: float) -> tuple[LoadGen, float]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.sink", "_load", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
        )  # fmt: skip
        gen = cls(process)
        words = await gen.expect("ready", within)
        return gen, float(words[0])

    async def expect(self, word: str, within: float) -> list[str]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = (await self.process.stdout.readline()).decode().strip()
                if not line:
                    raise RuntimeError(f"the load generator ended before {word!r}")
                head, *rest = line.split()
                if head == word:
                    return rest
                if head == "error":
                    raise RuntimeError(f"load generator: {line}")

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
