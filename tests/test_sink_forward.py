"""Forwarding into the core queue: raw and envelope publishes, dead letters, backend outage (F9
at the stage seam)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from cloud_sink.backends import (
    BackendError,
    CoreMessage,
    CoreQueue,
    DeadLetterMessage,
    PublishOutcome,
    SqliteCoreQueue,
    read_dead_letters,
    read_messages,
)
from cloud_sink.config import parse_config as parse_sink_config
from cloud_sink.forward import CALL_MESSAGES, Forwarder, unmappable_topic
from cloud_sink.rights import DevicePrefixRights
from cloud_sink.service import Sink
from mqtt_ingest import (
    ConnectRequest,
    Counters,
    Identity,
    IngestEvent,
    IngestServer,
    Refusal,
    failpoints,
)
from mqtt_ingest.envelope import (
    BATCH_FORMATS,
    EnvelopeEvent,
    encode,
    format_username,
    parse_username,
)
from tests.harness.pki import Pki
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet
from tests.harness.report import figures, until
from tests.harness.sink import device_token, write_sink_config

EPOCH = "a1b2c3d4e5f60718"


class UsernameParams:
    """Identity = client id, attributes = the user name's parameters (the JWT part is tested in
    test_sink_auth.py)."""

    async def authenticate(self, request: ConnectRequest) -> Identity | Refusal:
        _, params = parse_username(request.username or request.client_id)
        return Identity(request.client_id, params)


class SwitchableQueue:
    """The sqlite backend behind a switch that makes it unavailable (a fault at the seam), and
    with payload limits as a broker may have (NATS's max_payload)."""

    def __init__(self, inner: SqliteCoreQueue) -> None:
        self.inner = inner
        self.down = False
        self.max_event = 1 << 30
        self.max_dead_letter = 1 << 30

    def refusal(self, message: CoreMessage | DeadLetterMessage) -> str | None:
        limit = self.max_dead_letter if isinstance(message, DeadLetterMessage) else self.max_event
        if len(message.payload) > limit:
            return f"{len(message.payload)} bytes, over {limit}"
        return self.inner.refusal(message)

    async def recheck_limits(self) -> bool:
        return False

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        if self.down:
            raise BackendError("backend unavailable")
        return await self.inner.publish(messages)

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        if self.down:
            raise BackendError("backend unavailable")
        await self.inner.dead_letter(messages)

    async def probe(self) -> None:
        if self.down:
            raise BackendError("backend unavailable")
        await self.inner.probe()

    async def aclose(self) -> None:
        await self.inner.aclose()


def forwarding_server(queue: CoreQueue, metrics: Counters) -> IngestServer:
    """An ingest server forwarding into ``queue``, devices named by their client id."""
    return IngestServer(
        stage=Forwarder(queue, metrics, max_body=1024**2),
        authenticator=UsernameParams(),
        rights=DevicePrefixRights(),
        metrics=metrics,
    )


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("devices/d/t", None),
        ("devices/d/a.b", "'.'"),
        ("devices/d/*", "'*'"),
        ("devices/d/>", "'>'"),
        ("devices/d/a b", "white space"),
        ("devices//t", "empty topic level"),
    ],
)
def test_unmappable_topics(topic: str, problem: str | None) -> None:
    found = unmappable_topic(topic)
    assert (found is None) if problem is None else (problem in (found or ""))


async def test_raw_envelope_and_dead_letters_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = SwitchableQueue(await SqliteCoreQueue.open(path))
    metrics = Counters()
    server = forwarding_server(queue, metrics)
    envelope = encode(EPOCH, [EnvelopeEvent(5, 1000, b"e5"), EnvelopeEvent(6, 1001, b"e6")])
    async with server:
        raw = await RawClient.connected(server.port, "dev-1")
        await raw.send(publish_packet("devices/dev-1/t", b"raw", qos=1, packet_id=1))
        await raw.send(publish_packet("devices/dev-1/a.b", b"odd", qos=1, packet_id=2))
        assert [p.packet_id for p in [await raw.read(), await raw.read()] if p] == [1, 2]
        await raw.aclose()

        batch = await RawClient.open(server.port)
        await batch.send(connect_packet("dev-2", username="dev-2?format=batch-v1"))
        assert (await batch.read()) is not None
        await batch.send(publish_packet("devices/dev-2/t", envelope, qos=2, packet_id=1))
        await batch.send(publish_packet("devices/dev-2/t", envelope, qos=1, packet_id=2))
        await batch.send(publish_packet("devices/dev-2/t", b"not an envelope", qos=1, packet_id=3))
        acks = [await batch.read() for _ in range(3)]
        assert [(p.kind, p.packet_id) for p in acks if p] == [(5, 1), (4, 2), (4, 3)]

        queue.down = True
        await batch.send(publish_packet("devices/dev-2/t", envelope, qos=1, packet_id=4))
        assert await batch.closed_within(2), "acked or kept open while the backend was down"
    await queue.aclose()
    stored = [m for _, m in read_messages(path)]
    assert [m.payload for m in stored] == [b"raw", b"e5", b"e6"]
    assert stored[0].event_id.startswith("dev-1/raw/")
    assert [m.event_id for m in stored[1:]] == [f"dev-2/{EPOCH}/5", f"dev-2/{EPOCH}/6"]
    assert (stored[1].seq, stored[1].event_time_ms) == (5, 1000)
    dead = read_dead_letters(path)
    assert [(d.device_id, d.payload) for d in dead] == [
        ("dev-1", b"odd"),
        ("dev-2", b"not an envelope"),
    ]
    assert "'.'" in dead[0].reason
    assert "bad magic" in dead[1].reason
    assert metrics.get("forwarded", "duplicate") == 2
    assert metrics.get("forwarded", "dead_letter") == 2


async def test_each_connection_is_read_in_the_envelope_version_it_announced(
    tmp_path: Path,
) -> None:
    """batch-v2 and batch-v1 side by side: each connection's envelopes are decoded as its
    format's version, and one of the other version is malformed there (dead-lettered), not read
    by its header alone."""
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    metrics = Counters()
    events = [EnvelopeEvent(5, 1000, b"e5"), EnvelopeEvent(6 + 2**32, 999, b"e6")]
    v1, v2 = (encode(EPOCH, events, version=version) for version in (1, 2))
    async with forwarding_server(queue, metrics) as server:
        for device, fmt, good, other in (
            ("dev-5", "batch-v2", v2, v1),
            ("dev-6", "batch-v1", v1, v2),
        ):
            client = await RawClient.open(server.port)
            await client.send(connect_packet(device, username=f"{device}?format={fmt}"))
            assert (await client.read()) is not None
            await client.send(publish_packet(f"devices/{device}/t", good, qos=1, packet_id=1))
            await client.send(publish_packet(f"devices/{device}/t", other, qos=1, packet_id=2))
            acks = [await client.read() for _ in range(2)]
            assert [(p.kind, p.packet_id) for p in acks if p] == [(4, 1), (4, 2)]
            await client.aclose()
    await queue.aclose()
    stored = [(m.event_id, m.seq, m.event_time_ms, m.payload) for _, m in read_messages(path)]
    assert stored == [
        (f"{device}/{EPOCH}/{e.seq}", e.seq, e.event_time_ms, e.payload)
        for device in ("dev-5", "dev-6")
        for e in events
    ]
    dead = read_dead_letters(path)
    assert [(d.device_id, d.reason) for d in dead] == [
        ("dev-5", "version 1 on a connection that announced version 2"),
        ("dev-6", "version 2 on a connection that announced version 1"),
    ]


async def test_a_resent_dead_letter_is_stored_once(tmp_path: Path) -> None:
    """A device resends what was not acknowledged (a sink crash after the backend's commit, F3):
    its dead letters were stored again at each resend. Each now has an id its resend shares:
    the event id, or for an envelope that cannot be decoded a digest of its bytes. The events of
    an envelope on a topic the backends cannot map are dead letters one by one."""
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    server = forwarding_server(queue, Counters())
    envelope = encode(EPOCH, [EnvelopeEvent(5, 1000, b"e5"), EnvelopeEvent(6, 1001, b"e6")])
    async with server:
        for attempt in range(2):  # the same client id, a new connection: the resend
            batch = await RawClient.open(server.port)
            await batch.send(connect_packet("dev-2", username="dev-2?format=batch-v1"))
            assert (await batch.read()) is not None
            await batch.send(publish_packet("devices/dev-2/a.b", envelope, qos=1, packet_id=1))
            await batch.send(publish_packet("devices/dev-2/t", b"garbage", qos=1, packet_id=2))
            acks = [await batch.read() for _ in range(2)]
            assert [p.packet_id for p in acks if p] == [1, 2], attempt
            await batch.aclose()
        raw = await RawClient.connected(server.port, "dev-1")
        for packet_id in (1, 2):  # a raw publish has no id: two are two letters
            await raw.send(publish_packet("devices/dev-1/a.b", b"odd", qos=1, packet_id=packet_id))
            assert await raw.read() is not None
        await raw.aclose()
    await queue.aclose()
    dead = read_dead_letters(path)
    assert [(d.topic, d.payload) for d in dead] == [
        ("devices/dev-2/a.b", b"e5"),
        ("devices/dev-2/a.b", b"e6"),
        ("devices/dev-2/t", b"garbage"),
        ("devices/dev-1/a.b", b"odd"),
        ("devices/dev-1/a.b", b"odd"),
    ]
    assert [d.letter_id for d in dead[:2]] == [f"dev-2/{EPOCH}/5", f"dev-2/{EPOCH}/6"]
    assert dead[0].reason == f"topic level 'a.b' contains '.' (event dev-2/{EPOCH}/5)"
    assert dead[2].letter_id.startswith("dev-2/envelope/")
    assert dead[3].letter_id != dead[4].letter_id


async def test_a_compressed_envelope_is_bounded_as_an_uncompressed_one(tmp_path: Path) -> None:
    """The body once decompressed must fit ``max_body`` (the sink's ``max_packet_size``): a small
    zstd frame declaring a large body is refused, not inflated (it took 16 MiB each), and not
    acknowledged, as an uncompressed envelope of that size is refused at the packet limit (it
    was dead-lettered: a well-formed envelope of our agent's, its events then lost to the core
    queue)."""
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    counters = Counters()
    server = IngestServer(
        stage=Forwarder(queue, counters, max_body=64 * 1024),
        authenticator=UsernameParams(),
        rights=DevicePrefixRights(),
        metrics=counters,
    )
    fits = encode(EPOCH, [EnvelopeEvent(1, 1000, bytes(60_000))], zstd_level=3)
    bomb = encode(EPOCH, [EnvelopeEvent(2, 1000, bytes(70_000))], zstd_level=3)
    assert len(bomb) < 200
    async with server:
        client = await RawClient.open(server.port)
        await client.send(connect_packet("dev-3", username="dev-3?format=batch-v1"))
        assert (await client.read()) is not None
        await client.send(publish_packet("devices/dev-3/t", fits, qos=1, packet_id=1))
        await client.send(publish_packet("devices/dev-3/t", bomb, qos=1, packet_id=2))
        acks = [await client.read() for _ in range(2)]
        # The first acknowledged; the second not: its connection is closed.
        assert [(p.kind, p.packet_id) for p in acks if p] == [(4, 1)]
        await client.aclose()
        refused = counters.get("stage_events", reason="refused")
    await queue.aclose()
    assert [len(m.payload) for _, m in read_messages(path)] == [60_000]
    assert read_dead_letters(path) == []
    assert refused == 1


async def test_an_event_the_backend_cannot_take_is_dead_lettered_alone(tmp_path: Path) -> None:
    """One event of an envelope too large for the backend: the others are forwarded, it goes to
    the dead letters by itself (with its event id), and the envelope is acknowledged. Too large
    even as a dead letter: the envelope is not acknowledged, and nothing of it is forwarded."""
    path = tmp_path / "core.db"
    queue = SwitchableQueue(await SqliteCoreQueue.open(path))
    queue.max_event = 100
    server = IngestServer(
        stage=Forwarder(queue, Counters(), max_body=1024**2),
        authenticator=UsernameParams(),
        rights=DevicePrefixRights(),
    )
    mixed = encode(
        EPOCH,
        [
            EnvelopeEvent(1, 0, b"small"),
            EnvelopeEvent(2, 0, b"B" * 200),
            EnvelopeEvent(3, 0, b"fine"),
        ],
    )
    async with server:
        client = await RawClient.open(server.port)
        await client.send(connect_packet("dev-4", username="dev-4?format=batch-v1"))
        assert (await client.read()) is not None
        await client.send(publish_packet("devices/dev-4/t", mixed, qos=1, packet_id=1))
        ack = await client.read()
        assert ack is not None
        assert (ack.kind, ack.packet_id) == (4, 1)
        queue.max_dead_letter = 100
        too_big = encode(EPOCH, [EnvelopeEvent(4, 0, b"ok"), EnvelopeEvent(5, 0, b"C" * 200)])
        await client.send(publish_packet("devices/dev-4/t", too_big, qos=1, packet_id=2))
        assert await client.closed_within(2), "acknowledged what the backend cannot store"
    await queue.aclose()
    assert [m.payload for _, m in read_messages(path)] == [b"small", b"fine"]
    [dead] = read_dead_letters(path)
    assert dead.payload == b"B" * 200
    assert dead.reason == f"200 bytes, over 100 (event dev-4/{EPOCH}/2)"


async def test_a_large_batch_of_envelopes_goes_to_the_backend_in_bounded_calls(
    tmp_path: Path,
) -> None:
    """One stage call can hold 512 envelopes of up to 1,000 events each: decoded whole it made
    one backend call of every message at once (hundreds of MB for one device's batch)."""
    calls: list[int] = []

    class Recording(SwitchableQueue):
        async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
            calls.append(len(messages))
            return await super().publish(messages)

    path = tmp_path / "core.db"
    queue = Recording(await SqliteCoreQueue.open(path))
    forwarder = Forwarder(queue, Counters(), max_body=1024**2)
    identity = Identity("dev-4", {"format": "batch-v1"})

    def envelope(n: int) -> bytes:
        return encode(EPOCH, [EnvelopeEvent(n * 1000 + i + 1, 0, b"") for i in range(1000)])

    batch = [
        IngestEvent(identity, "dev-4", "devices/dev-4/t", envelope(n), 1, False, 1.0)
        for n in range(25)
    ]
    assert await forwarder.store(batch) is None
    await queue.aclose()
    assert calls == [CALL_MESSAGES, 25_000 - CALL_MESSAGES]
    assert sum(1 for _ in read_messages(path)) == 25_000


@pytest.mark.parametrize("fmt", sorted(BATCH_FORMATS))
async def test_the_sink_weighs_envelopes_into_stage_calls_of_bounded_events(
    tmp_path: Path, pki: Pki, fmt: str
) -> None:
    """The sink's server weighs an envelope by its events (`Forwarder.weight`): 30 envelopes of
    1,000 events that queue up behind a slow stage call go on in two calls of at most
    `CALL_MESSAGES` events, each one backend call, not in one call of 30,000 events (512
    envelopes of 1,000 made one stage call a minute of storing, past the stage timeout)."""
    device = pki.device(f"fw-{uuid.uuid4().hex[:6]}")
    topic = f"devices/{device.device_id}/t"
    version = BATCH_FORMATS[fmt]
    first = encode(EPOCH, [EnvelopeEvent(100_001, 0, b"first")], version=version)
    envelopes = [
        encode(
            EPOCH, [EnvelopeEvent(n * 1000 + i + 1, 0, b"e") for i in range(1000)], version=version
        )
        for n in range(30)
    ]
    username = format_username(device.device_id, format=fmt)
    connect = connect_packet(
        device.device_id, username=username, password=device_token(device).encode()
    )
    failpoints.arm("ingest.before_store", "sleep:1@1")  # the first stage call takes 1 s
    try:
        async with Sink(parse_sink_config(write_sink_config(tmp_path, pki).read_text())) as sink:
            raw = await RawClient.open(sink.port, ssl_context=pki.client_context(device))
            try:
                await raw.send(connect)
                connack = await raw.read(10)
                assert connack is not None
                assert connack.body[1] == 0
                await raw.send(publish_packet(topic, first, qos=1, packet_id=1))
                await until(lambda: sink.metrics.get("events_received") == 1)
                for packet_id, envelope in enumerate(envelopes, start=2):
                    await raw.send(publish_packet(topic, envelope, qos=1, packet_id=packet_id))
                acks = [await raw.read(20) for _ in range(1 + len(envelopes))]
            finally:
                await raw.aclose()
            stage_calls = sink.metrics.get("stage_batches")
            backend_calls = sink.prometheus.registry.get_sample_value(
                "cloud_sink_core_queue_confirm_seconds_count",
                {"backend": "sqlite", "operation": "publish"},
            )
    finally:
        failpoints.disarm_all()
    stored = sum(1 for _ in read_messages(tmp_path / "core.db"))
    figures("weighed stage calls", stage_calls=stage_calls, backend_calls=backend_calls)
    assert [ack.kind if ack else None for ack in acks] == [4] * 31  # PUBACK each
    assert stored == 30_001
    # The first envelope alone, then 20 envelopes (20,000 events), then the other 10.
    assert stage_calls == 3
    assert backend_calls == 3
