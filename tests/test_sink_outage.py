"""The sink while its core queue is down or slow (RELIABILITY F9), against the real backends.

The fault sits at the seam between the sink and its backend: a chaos proxy in front of RabbitMQ or
NATS (blackhole: a silent cut; close: FIN and refused connections), a failpoint inside the sqlite
backend's write transactions. A device keeps publishing through the sink and resends whatever was
not acknowledged; afterwards every event is in the core queue, exactly once where the backend
dedupes (NATS, sqlite) and at least once by ``message_id`` on RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cloud_sink import health
from cloud_sink.backends import read_messages
from cloud_sink.backends.base import (
    BackendError,
    CoreMessage,
    DeadLetterMessage,
    PublishOutcome,
)
from cloud_sink.config import SinkConfig, parse_config
from cloud_sink.health import BackendDown, BackendGuard, BackendState
from cloud_sink.metrics import SinkMetrics
from cloud_sink.service import Sink
from mqtt_ingest import Counters, failpoints
from mqtt_ingest.backoff import Backoff
from tests.harness.brokers import (
    NatsNames,
    RabbitNames,
    amqp_connection,
    drain_queue,
    nats_connection,
    read_stream,
)
from tests.harness.chaos import ChaosProxy, ChaosProxyFactory
from tests.harness.disk import fill, small_disk
from tests.harness.pki import Pki
from tests.harness.report import figures as print_figures
from tests.harness.sink import ResendingDevice, core_message, http_get, write_sink_config

pytestmark = [pytest.mark.fault, pytest.mark.integration]

OUTAGE = 4.0
"""Seconds the backend stays away once the sink noticed."""
BACKEND_TIMEOUT = "1.5s"
SERVER_UNAVAILABLE = 3


def sink_config(tmp_path: Path, pki: Pki, backend: str, *, max_inflight: int = 256) -> SinkConfig:
    text = write_sink_config(tmp_path, pki).read_text()
    text = text[: text.index("[backend]")].replace(
        "[auth]", f"max_inflight = {max_inflight}\n\n[auth]"
    )
    text += (
        f'{backend}\n[backend.reconnect]\ninitial = "0.2s"\nmax = "1s"\n\n'
        '[health]\nhost = "127.0.0.1"\nport = 0\n'
    )
    return parse_config(text)


def amqp_backend(names: RabbitNames, port: int) -> str:
    return (
        f'[backend]\ntype = "amqp"\nurl = "amqp://guest:guest@127.0.0.1:{port}/"\n'
        f'exchange = "{names.exchange}"\nqueue = "{names.queue}"\n'
        f'dead_letter_exchange = "{names.dead_letter_exchange}"\n'
        f'dead_letter_queue = "{names.dead_letter_queue}"\ntimeout = "{BACKEND_TIMEOUT}"\n'
    )


def nats_backend(names: NatsNames, port: int) -> str:
    return (
        f'[backend]\ntype = "nats"\nurl = "nats://127.0.0.1:{port}"\n'
        f'stream = "{names.stream}"\nsubject_prefix = "{names.subject_prefix}"\n'
        f'dead_letter_stream = "{names.dead_letter_stream}"\n'
        f'dead_letter_subject_prefix = "{names.dead_letter_subject_prefix}"\n'
        f'timeout = "{BACKEND_TIMEOUT}"\n'
    )


async def proxy_to(factory: ChaosProxyFactory, url: str, default_port: int) -> ChaosProxy:
    parts = urlsplit(url)
    return await factory(parts.hostname or "127.0.0.1", parts.port or default_port)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110  # polling plain counters
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


async def stream_ids(names: NatsNames) -> list[str]:
    async with nats_connection(names.url) as client:
        info = await client.jsm(timeout=5).stream_info(names.stream)
    count = int(info.state.messages)
    stored = await read_stream(names.url, names.stream, expected=count, timeout=20)
    return [m.headers["event-id"] for m in stored]


async def queue_depth(names: RabbitNames) -> int:
    async with amqp_connection(names.url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.queue, passive=True)
        await channel.close()
    return int(queue.declaration_result.message_count or 0)


async def run_outage(
    sink: Sink,
    device: ResendingDevice,
    caplog: pytest.LogCaptureFixture,
    *,
    fault: Callable[[], Awaitable[None]],
    heal: Callable[[], Awaitable[None]],
    confirmed: Callable[[], Awaitable[int]],
) -> None:
    """Fault while the device publishes; checks during the outage; heal; the device finishes.

    ``confirmed()`` counts what the backend holds now (by the test's own reader).
    """
    caplog.set_level(logging.INFO, logger="cloud_sink")
    task = asyncio.create_task(device.run(), name="test.device")
    try:
        await until(lambda: len(device.acked) >= 20, 20, "20 events acked before the fault")
        await fault()
        await until(
            lambda: device.refusals.get(SERVER_UNAVAILABLE, 0) >= 2,
            20,
            "the device refused with CONNACK 3 while the backend is down",
        )
        assert sink.backend.state is BackendState.DOWN
        status, body = await asyncio.to_thread(http_get, sink.health_port, "/readyz")
        assert (status, body.split(":")[0]) == (503, "not ready")
        assert "core queue down" in body
        assert (await asyncio.to_thread(http_get, sink.health_port, "/healthz"))[0] == 200
        # Nothing is acknowledged that the backend does not hold.
        acked_during = len(device.acked)
        assert await confirmed() >= acked_during
        received = sink.metrics.get("events_received")
        await asyncio.sleep(OUTAGE)
        assert sink.metrics.get("events_received") == received, "read while the backend is down"
        assert len(device.acked) == acked_during, "acknowledged while the backend is down"
        await heal()
        await asyncio.wait_for(task, 60)
    finally:
        task.cancel()
    assert sink.backend.available, "not back up by itself"
    assert (await asyncio.to_thread(http_get, sink.health_port, "/readyz"))[0] == 200
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("core queue down") for m in messages) == 1, messages
    assert sum(m.startswith("core queue back") for m in messages) == 1, messages
    assert not any("refused CONNECT" in m for m in messages), "a log line per refused device"


def figures(label: str, device: ResendingDevice, stored: list[str], sink: Sink) -> tuple[int, int]:
    """Print the evidence; return (lost, duplicates)."""
    expected = {device.event_id(seq) for seq in range(1, device.total + 1)}
    counts = Counter(stored)
    lost = len(expected - counts.keys())
    duplicates = sum(n - 1 for n in counts.values())
    # RELIABILITY.md: every fault test prints its figures, the evidence behind the pass.
    print(  # noqa: T201
        f"\nF9 {label}: events={device.total} sent={device.sent} acked={len(device.acked)}"
        f" faults: outages={sink.backend.outages}"
        f" refused(CONNACK 3)={device.refusals.get(SERVER_UNAVAILABLE, 0)}"
        f" lost_connections={device.lost_connections} -> lost={lost} duplicates={duplicates}"
        f" (backend-side duplicates={sink.metrics.get('forwarded', 'duplicate')})"
    )
    assert counts.keys() <= expected, "events in the core queue that the device never sent"
    return lost, duplicates


def new_device(pki: Pki, sink: Sink, label: str) -> ResendingDevice:
    creds = pki.device(f"f9-{label}-{uuid.uuid4().hex[:6]}")
    return ResendingDevice(sink.port, creds, pki, total=200, interval=0.02)


@pytest.mark.parametrize("cut", ["blackhole", "close"])
async def test_rabbitmq_outage_no_ack_refused_then_all_delivered(
    tmp_path: Path,
    pki: Pki,
    rabbitmq: RabbitNames,
    chaos_proxy_factory: ChaosProxyFactory,
    caplog: pytest.LogCaptureFixture,
    cut: str,
) -> None:
    proxy = await proxy_to(chaos_proxy_factory, rabbitmq.url, 5672)
    config = sink_config(tmp_path, pki, amqp_backend(rabbitmq, proxy.port))

    async def fault() -> None:
        proxy.blackhole() if cut == "blackhole" else await proxy.close()

    async def heal() -> None:
        proxy.pass_through()

    async def confirmed() -> int:
        return await queue_depth(rabbitmq)

    async with Sink(config) as sink:
        device = new_device(pki, sink, f"amqp-{cut}")
        await run_outage(sink, device, caplog, fault=fault, heal=heal, confirmed=confirmed)
    depth = await queue_depth(rabbitmq)
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=depth, timeout=20)
    lost, _ = figures(f"rabbitmq {cut}", device, [m.message_id or "" for m in received], sink)
    assert lost == 0  # duplicates are allowed: consumers dedupe by message_id


# nats-py (2.16) leaks the socket of a failed reconnect attempt (see test_sink_nats_faults.py).
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
@pytest.mark.parametrize("cut", ["blackhole", "close"])
async def test_nats_outage_no_ack_refused_then_all_delivered_once(
    tmp_path: Path,
    pki: Pki,
    nats_jetstream: NatsNames,
    chaos_proxy_factory: ChaosProxyFactory,
    caplog: pytest.LogCaptureFixture,
    cut: str,
) -> None:
    proxy = await proxy_to(chaos_proxy_factory, nats_jetstream.url, 4222)
    config = sink_config(tmp_path, pki, nats_backend(nats_jetstream, proxy.port))

    async def fault() -> None:
        proxy.blackhole() if cut == "blackhole" else await proxy.close()

    async def heal() -> None:
        proxy.pass_through()

    async def confirmed() -> int:
        return len(await stream_ids(nats_jetstream))

    async with Sink(config) as sink:
        device = new_device(pki, sink, f"nats-{cut}")
        await run_outage(sink, device, caplog, fault=fault, heal=heal, confirmed=confirmed)
    stored = await stream_ids(nats_jetstream)
    assert figures(f"nats {cut}", device, stored, sink) == (0, 0)


async def test_an_idle_sink_is_not_ready_once_its_core_queue_went_away(
    tmp_path: Path,
    pki: Pki,
    nats_jetstream: NatsNames,
    chaos_proxy_factory: ChaosProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a failed publish marked the backend down: an idle sink answered /readyz 200 for a
    core queue that had gone away, and took devices in until their first publish. Now the
    guard probes a backend that has not answered for IDLE_PROBE seconds."""
    monkeypatch.setattr(health, "IDLE_PROBE", 0.3)
    proxy = await proxy_to(chaos_proxy_factory, nats_jetstream.url, 4222)
    config = sink_config(tmp_path, pki, nats_backend(nats_jetstream, proxy.port))
    async with Sink(config) as sink:
        assert (await asyncio.to_thread(http_get, sink.health_port, "/readyz"))[0] == 200
        proxy.blackhole()
        await until(lambda: sink.backend.state is BackendState.DOWN, 20, "marked down, idle")
        status, body = await asyncio.to_thread(http_get, sink.health_port, "/readyz")
        assert (status, body.split(":")[0]) == (503, "not ready")
        proxy.pass_through()
        await until(lambda: sink.backend.available, 60, "back up by itself")
        assert (await asyncio.to_thread(http_get, sink.health_port, "/readyz"))[0] == 200


@pytest.mark.parametrize("cut", ["failpoint", "locked", "full-disk"])
async def test_sqlite_file_failure_no_ack_refused_then_all_delivered_once(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, cut: str
) -> None:
    """The file fails (failpoint inside every write transaction), another process holds its
    write lock for longer than the sink's busy timeout, or its filesystem (a real small tmpfs)
    fills up. A full disk used to make SQLite fail on the last bytes while the probe's empty
    transaction passed: the sink went down and up every second or so, disconnecting every
    device each time. Now the disk reserve makes it one outage, until there is room."""
    with contextlib.ExitStack() as stack:
        directory = tmp_path
        if cut == "full-disk":
            directory = stack.enter_context(small_disk(tmp_path / "disk", 8 * 1024**2))
        path = directory / "core.db"
        backend = f'[backend]\ntype = "sqlite"\npath = "{path}"\ndisk_reserve = "2MiB"\n'
        config = sink_config(tmp_path, pki, backend)
        locker = stack.enter_context(
            contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=10))
        )
        filler: list[Path] = []

        async def fault() -> None:
            if cut == "failpoint":
                failpoints.arm("sink.sqlite.write", "raise")
            elif cut == "locked":
                locker.execute("BEGIN IMMEDIATE")
            else:
                filler.append(fill(directory, 1024**2))  # another process takes the disk

        async def heal() -> None:
            failpoints.disarm_all()
            if locker.in_transaction:
                locker.execute("ROLLBACK")
            for file in filler:
                file.unlink()

        async def confirmed() -> int:
            return len(list(read_messages(path)))

        try:
            async with Sink(config) as sink:
                device = new_device(pki, sink, f"sqlite-{cut}")
                await run_outage(sink, device, caplog, fault=fault, heal=heal, confirmed=confirmed)
        finally:
            failpoints.disarm_all()
        stored = [m.event_id for _, m in read_messages(path)]
    assert figures(f"sqlite {cut}", device, stored, sink) == (0, 0)
    if cut == "full-disk":
        down = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("core queue down")
        ]
        assert "the disk is nearly full" in down[0], down


@pytest.mark.parametrize("backend", ["amqp", "nats"])
async def test_slow_confirms_slow_the_producer_down_without_loss(
    tmp_path: Path,
    pki: Pki,
    rabbitmq: RabbitNames,
    nats_jetstream: NatsNames,
    chaos_proxy_factory: ChaosProxyFactory,
    backend: str,
) -> None:
    """300 ms each way to the backend: batches take longer, connections stay within their
    in-flight limit (the sink stops reading), nothing is refused, closed or lost."""
    if backend == "amqp":
        proxy = await proxy_to(chaos_proxy_factory, rabbitmq.url, 5672)
        section = amqp_backend(rabbitmq, proxy.port)
    else:
        proxy = await proxy_to(chaos_proxy_factory, nats_jetstream.url, 4222)
        section = nats_backend(nats_jetstream, proxy.port)
    section = section.replace(f'timeout = "{BACKEND_TIMEOUT}"', 'timeout = "10s"')
    max_inflight = 8
    config = sink_config(tmp_path, pki, section, max_inflight=max_inflight)
    async with Sink(config) as sink:
        creds = pki.device(f"f9-slow-{backend}-{uuid.uuid4().hex[:6]}")
        device = ResendingDevice(sink.port, creds, pki, total=64, interval=0.001, window=32)
        proxy.latency(0.3)
        task = asyncio.create_task(device.run(), name="test.device")
        most_in_flight = 0
        try:
            async with asyncio.timeout(90):
                while not task.done():
                    metrics = sink.metrics
                    in_flight = metrics.get("events_received") - metrics.get("events_acked")
                    most_in_flight = max(most_in_flight, in_flight)
                    await asyncio.sleep(0.02)
            await task
        finally:
            task.cancel()
        assert sink.backend.outages == 0
    if backend == "amqp":
        received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=64, timeout=20)
        stored = [m.message_id or "" for m in received]
    else:
        stored = await stream_ids(nats_jetstream)
    assert figures(f"slow confirms {backend}", device, stored, sink) == (0, 0)
    print(f"most events in flight in the sink: {most_in_flight} (limit {max_inflight})")  # noqa: T201
    assert 0 < most_in_flight <= max_inflight
    assert device.refusals == {}
    assert device.lost_connections == 0
    assert device.connections == 1


class ProbeOnlyQueue:
    """A core queue whose probe passes while every publish fails (a queue deleted behind a
    broker that answers, a full disk): the seam the guard is built on, nothing else faked."""

    def refusal(self, message: CoreMessage | DeadLetterMessage) -> str | None:
        return None

    async def recheck_limits(self) -> bool:
        return False

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        raise BackendError("every publish fails")

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        raise BackendError("every dead letter fails")

    async def probe(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_an_outage_right_after_recovery_continues_the_backoff() -> None:
    """Each such flap used to start the backoff over (probe, "back", publish fails, "down"):
    hundreds of cycles a second at the initial delay, two log lines each, N sinks hammering the
    broker. It now slows to the cap."""
    guard = BackendGuard(ProbeOnlyQueue(), Backoff(initial=0.01, cap=0.32), Counters())
    async with asyncio.TaskGroup() as tasks:
        runner = tasks.create_task(guard.run())
        deadline = asyncio.get_running_loop().time() + 1.5
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - asyncio.get_running_loop().time()):
                    await guard.wait_available()
            with contextlib.suppress(BackendError):
                await guard.publish([core_message(1)])
        runner.cancel()
    print_figures("flapping backend, 1.5 s", outages=guard.outages)
    assert 3 <= guard.outages <= 40  # restarting the backoff each time: 300 and more


class ScriptedQueue(ProbeOnlyQueue):
    """A core queue whose publishes fail while ``down`` and whose probes fail (or raise a
    CancelledError from within, as aiormq does when its connection closes) as scripted."""

    def __init__(self) -> None:
        self.down = False
        self.failing_probes = 0
        self.cancelled_probes = 0

    async def publish(self, messages: Sequence[CoreMessage]) -> PublishOutcome:
        if self.down:
            raise BackendError("down")
        return PublishOutcome(len(messages), 0)

    async def probe(self) -> None:
        if self.cancelled_probes:
            self.cancelled_probes -= 1
            raise asyncio.CancelledError
        if self.failing_probes:
            self.failing_probes -= 1
            raise BackendError("still down")


class RecordedBackoff(Backoff):
    """Backoff that waits 1 ms and records the attempt numbers it was asked for."""

    attempts: list[int]

    def delay(self, attempt: int, rng: Callable[[], float] = lambda: 0.0) -> float:
        self.attempts.append(attempt)
        return 0.001


async def outage(guard: BackendGuard, queue: ScriptedQueue) -> None:
    """One outage (a publish fails), over once the probes pass."""
    queue.down = True
    with contextlib.suppress(BackendError):
        await guard.publish([core_message(1)])
    queue.down = False
    async with asyncio.timeout(5):
        await guard.wait_available()


async def test_a_probe_cancelled_from_within_is_a_failed_probe_not_the_end_of_the_guard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by review: the reconnect task caught Exception only; a CancelledError raised by the
    backend's probe ended it silently (a TaskGroup ignores a child that ends cancelled), and
    the sink stayed down, CONNACK 3 to every device, until a restart."""
    queue = ScriptedQueue()
    backoff = RecordedBackoff(0.01, 0.1)
    backoff.attempts = []
    guard = BackendGuard(queue, backoff, Counters())
    async with asyncio.TaskGroup() as tasks:
        runner = tasks.create_task(guard.run())
        queue.cancelled_probes = 2
        await outage(guard, queue)
        assert guard.state is BackendState.UP
        assert not runner.done()
        # An outage right after one that took many probes goes on from where its backoff was
        # (docs/sink.md); it started over from the number of flaps in a row.
        queue.failing_probes = 5
        await outage(guard, queue)
        assert backoff.attempts[-6:] == [3, 4, 5, 6, 7, 8]  # the first: 0, 1 (cancelled), 2
        backoff.attempts.clear()
        caplog.clear()
        caplog.set_level(logging.INFO, logger="cloud_sink")
        await outage(guard, queue)
        assert backoff.attempts == [9]
        back = [r.getMessage() for r in caplog.records if "core queue back" in r.getMessage()]
        assert len(back) == 1
        assert back[0].endswith("(1 probe(s)): accepting and reading again"), back
        runner.cancel()


async def test_only_calls_that_reach_the_backend_count_as_its_errors() -> None:
    """Found by review: the calls the guard refused during an outage, without asking the
    backend, counted in cloud_sink_core_queue_errors_total as if the backend had failed each."""
    queue = ScriptedQueue()
    guard = BackendGuard(queue, Backoff(initial=60, cap=60), Counters())
    metrics = SinkMetrics(
        Counters(), "scripted", server=lambda: None, guard=lambda: guard, not_ready=lambda: None
    )
    timed = metrics.timed(guard)
    queue.down = True
    for _ in range(5):  # the first reaches the backend and fails; the others are refused
        with pytest.raises(BackendError):
            await timed.publish([core_message(1)])
    with pytest.raises(BackendDown):
        await timed.dead_letter([dead_letter_message()])
    errors = metrics.registry.get_sample_value(
        "cloud_sink_core_queue_errors_total", {"backend": "scripted", "operation": "publish"}
    )
    dead_errors = metrics.registry.get_sample_value(
        "cloud_sink_core_queue_errors_total", {"backend": "scripted", "operation": "dead_letter"}
    )
    assert (errors, dead_errors, guard.outages) == (1, 0, 1)


async def test_a_confirmed_dead_letter_is_an_answer_no_idle_probe_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: only a confirmed publish counted as the backend answering, so a sink
    whose traffic was all dead letters probed its backend every IDLE_PROBE seconds anyway."""
    monkeypatch.setattr(health, "IDLE_PROBE", 0.3)
    queue = CountingProbes()
    guard = BackendGuard(queue, Backoff(initial=60, cap=60), Counters())
    async with asyncio.TaskGroup() as tasks:
        runner = tasks.create_task(guard.run())
        for _ in range(12):  # 1.2 s of dead letters, one every 0.1 s
            await guard.dead_letter([dead_letter_message()])
            await asyncio.sleep(0.1)
        dead_lettering = queue.probes
        await asyncio.sleep(0.7)  # then idle: probed
        runner.cancel()
    print_figures("dead letters only", probes_while_dead_lettering=dead_lettering)
    assert dead_lettering == 0
    assert queue.probes >= 1


class CountingProbes(ScriptedQueue):
    """Dead letters are confirmed; probes are counted."""

    probes = 0

    async def dead_letter(self, messages: Sequence[DeadLetterMessage]) -> None:
        return None

    async def probe(self) -> None:
        self.probes += 1


def dead_letter_message() -> DeadLetterMessage:
    return DeadLetterMessage("dev-1", "devices/dev-1/t", b"x", "unmappable", 1, "dev-1/e/1")
