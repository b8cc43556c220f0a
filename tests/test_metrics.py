"""Prometheus metrics (issue #7, docs/metrics.md): real HTTP scrapes of agents and sinks, parsed
with prometheus-client's parser, after workloads whose counts are known exactly."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from pathlib import Path

import aiomqtt
import prometheus_client
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from cloud_sink.config import SinkConfig
from cloud_sink.config import parse_config as parse_sink_config
from cloud_sink.service import Sink
from edge_agent import Agent, load_config
from edge_agent.buffer import BufferFull, inspect
from edge_agent.config import parse_config as parse_agent_config
from mqtt_ingest import ConnackCode, Counters, exposition, failpoints
from mqtt_ingest.envelope import FORMAT_BATCH_V1, EnvelopeEvent, encode, format_username
from mqtt_ingest.exposition import MAX_CLIENTS, MetricsServer
from mqtt_ingest.http import HttpEndpoint, Request, Response
from mqtt_ingest.prometheus import CountersCollector, CounterSpec
from tests.harness.agent import start_agent, uplink_section, write_config
from tests.harness.agent_cli import acli
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ProcessFactory
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet
from tests.harness.report import figures, until
from tests.harness.sink import device_token, http_get, write_sink_config

METRICS = '\n[metrics]\nhost = "127.0.0.1"\nport = 0\n'
AGENT_METRICS = METRICS + 'backlog_refresh = "1ms"\n'
TOPICS = """
[[topics]]
filter = "bulk/#"
on_full = "drop-oldest"

[[topics]]
filter = "#"
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of ``GET /metrics``, keyed by (name, labels)."""
    status, body = await asyncio.to_thread(http_get, port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have {sorted(k[0] for k in samples)}"
    return samples[key]


def with_name(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def agent_config(tmp_path: Path, *, buffer: str = "", uplink: str = "") -> Path:
    path = write_config(tmp_path / "agent", buffer=buffer, uplink=uplink, topics=TOPICS)
    path.write_text(path.read_text() + AGENT_METRICS)
    return path


# -- the agent ------------------------------------------------------------------------------------


async def test_agent_without_uplink_counts_what_it_accepted(tmp_path: Path) -> None:
    config = load_config(agent_config(tmp_path))
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        for i in range(30):
            await agent.publish(("sensors/a", "sensors/b", "alarms/x")[i % 3], b"12345")
        assert agent.listener_port is not None
        async with aiomqtt.Client("127.0.0.1", agent.listener_port, identifier="local-1") as c:
            for _ in range(4):
                await c.publish("sensors/a", b"xy", qos=1)
        samples = await scrape(agent.metrics_port)
    figures("agent metrics", accepted=value(samples, "edge_agent_accepted_events_total"))
    assert value(samples, "edge_agent_accepted_events_total") == 34
    assert value(samples, "edge_agent_buffer_events") == 34
    assert value(samples, "edge_agent_buffer_bytes") == 30 * 5 + 4 * 2
    assert with_name(samples, "edge_agent_backlog_events") == {
        frozenset({("topic", "sensors/a")}): 14,
        frozenset({("topic", "sensors/b")}): 10,
        frozenset({("topic", "alarms/x")}): 10,
    }
    assert value(samples, "edge_agent_backlog_bytes", topic="sensors/a") == 10 * 5 + 4 * 2
    assert 0 <= value(samples, "edge_agent_backlog_oldest_age_seconds", topic="sensors/a") < 60
    assert value(samples, "edge_agent_uplink_state", state="disabled") == 1
    assert value(samples, "edge_agent_uplink_state", state="online") == 0
    assert value(samples, "edge_agent_delivered_events_total") == 0
    assert value(samples, "edge_agent_dropped_events_total", reason="buffer-full") == 0
    assert value(samples, "edge_agent_dead_letters") == 0
    # Every commit observed once: its events add up to what was accepted.
    assert value(samples, "edge_agent_buffer_commit_events_sum") == 34
    commits = value(samples, "edge_agent_buffer_commit_seconds_count")
    assert 1 <= commits <= 34
    assert value(samples, "edge_agent_buffer_commit_seconds_sum") > 0
    assert value(samples, "edge_agent_disk_reserve_bytes") == 16 * 1024**2
    assert value(samples, "edge_agent_disk_free_bytes") > 0
    assert value(samples, "edge_agent_listener_events_acked_total") == 4
    assert value(samples, "edge_agent_listener_connects_accepted_total") == 1
    info = with_name(samples, "edge_agent_info")
    assert [dict(labels)["device_id"] for labels in info] == ["dev-1"]
    if ("process_io_write_bytes_total", frozenset()) in samples:  # where /proc/self/io exists
        assert value(samples, "process_io_write_bytes_total") > 0


async def test_drop_oldest_overflow_is_counted(tmp_path: Path) -> None:
    config = load_config(agent_config(tmp_path, buffer="max_events = 5"))
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        for i in range(8):
            await agent.publish("bulk/v", f"{i:03}".encode())
        samples = await scrape(agent.metrics_port)
    assert value(samples, "edge_agent_accepted_events_total") == 8
    assert value(samples, "edge_agent_dropped_events_total", reason="buffer-full") == 3
    assert value(samples, "edge_agent_dropped_bytes_total", reason="buffer-full") == 9
    assert value(samples, "edge_agent_dropped_events_total", reason="ttl") == 0
    assert value(samples, "edge_agent_backlog_events", topic="bulk/v") == 5
    assert value(samples, "edge_agent_buffer_max_events") == 5


async def test_dead_letters_are_exported_with_what_counts_against_the_limits(
    tmp_path: Path,
) -> None:
    """Dead letters count against max_events/max_bytes (docs/buffer.md): the metrics must let an
    alert see a buffer filled by them, not only the backlog (docs/metrics.md's alert example)."""
    config = load_config(agent_config(tmp_path, buffer='max_bytes = "100B"'))
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        ids = [await agent.publish("sensors/x", b"x" * 20) for _ in range(5)]
        for event_id in ids[:4]:
            assert await agent.buffer.dead_letter(int(event_id.rsplit("/", 1)[1]), "poison")
        with pytest.raises(BufferFull, match="4 dead letters among them"):
            await agent.publish("sensors/x", b"x")
        samples = await scrape(agent.metrics_port)
    assert value(samples, "edge_agent_buffer_bytes") == 20
    assert value(samples, "edge_agent_buffer_events") == 1
    assert value(samples, "edge_agent_dead_letters") == 4
    assert value(samples, "edge_agent_dead_letter_bytes") == 80
    stored = value(samples, "edge_agent_buffer_bytes") + value(
        samples, "edge_agent_dead_letter_bytes"
    )
    assert stored == value(samples, "edge_agent_buffer_max_bytes")


async def test_backlog_scans_are_rate_limited_and_topics_capped(tmp_path: Path) -> None:
    path = agent_config(tmp_path)
    text = path.read_text().replace('backlog_refresh = "1ms"', 'backlog_refresh = "1h"')
    config = parse_agent_config(text + "max_topics = 2\n")
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        for topic, count in (("t/a", 3), ("t/b", 2), ("t/c", 1), ("t/d", 1)):
            for _ in range(count):
                await agent.publish(topic, b"x")
        first = await scrape(agent.metrics_port)
        await agent.publish("t/a", b"x")
        second = await scrape(agent.metrics_port)
    assert with_name(first, "edge_agent_backlog_events") == {
        frozenset({("topic", "t/a")}): 3,
        frozenset({("topic", "t/b")}): 2,
        frozenset({("topic", "#other")}): 2,
    }
    # Within backlog_refresh: the scanned figures are the last ones, the in-memory ones exact.
    assert value(second, "edge_agent_backlog_events", topic="t/a") == 3
    assert value(second, "edge_agent_buffer_events") == 8
    assert value(second, "edge_agent_accepted_events_total") == 8
    assert value(second, "edge_agent_backlog_scan_age_seconds") > 0


async def test_a_scan_slower_than_a_scrape_serves_the_next_scrapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape that stopped waiting for a slow scan (its refresh timeout) threw the scan's
    figures away: the next scrape started a scan of its own, and so on, so no backlog figure
    was ever served and the commits waited behind scan after scan."""
    monkeypatch.setattr(exposition, "REFRESH_TIMEOUT", 0.2)
    path = agent_config(tmp_path)
    config = parse_agent_config(path.read_text().replace('"1ms"', '"1h"'))
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        await agent.publish("t/a", b"x")
        failpoints.arm("buffer.stats", "sleep:0.6")  # every scan: longer than a scrape waits
        try:
            first = await scrape(agent.metrics_port)  # served without waiting for it
            await asyncio.sleep(0.8)
            second = await scrape(agent.metrics_port)
        finally:
            failpoints.disarm_all()
    assert with_name(first, "edge_agent_backlog_events") == {}
    assert value(second, "edge_agent_backlog_events", topic="t/a") == 1
    assert value(first, "edge_agent_buffer_events") == value(second, "edge_agent_buffer_events")


async def test_agent_process_logs_its_metrics_port_and_closes_it_on_sigterm(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    config = agent_config(tmp_path)
    agent = start_agent(process_factory, config)
    found = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", agent.output())
    assert found is not None, agent.output()
    port = int(found.group(1))
    cli_config = tmp_path / "cli.toml"  # publish through the running agent's listener
    cli_config.write_text(
        config.read_text().replace("[listener]\nport = 0", f"[listener]\nport = {agent.port}")
    )
    for i in range(3):
        result = await acli(cli_config, "publish", "sensors/p", str(i))
        assert result.returncode == 0, result.stderr
    samples = await scrape(port)
    assert value(samples, "edge_agent_accepted_events_total") == 3
    assert value(samples, "edge_agent_backlog_events", topic="sensors/p") == 3
    assert value(samples, "edge_agent_listener_events_acked_total") == 3
    assert await agent.asigterm() == 0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


async def test_agent_and_sink_count_the_same_delivered_events(tmp_path: Path, pki: Pki) -> None:
    device = pki.device(f"m-{uuid.uuid4().hex[:6]}")
    async with Sink(sink_config(tmp_path, pki)) as sink:
        uplink = uplink_section(pki, device, sink.port)
        path = write_config(
            tmp_path / "agent", device_id=device.device_id, uplink=uplink, topics=TOPICS
        )
        path.write_text(path.read_text() + AGENT_METRICS)
        config = load_config(path)
        async with Agent(config) as agent:
            assert agent.metrics_port is not None
            for i in range(50):
                await agent.publish(("sensors/a", "alarms/b")[i % 2], f"{i}".encode())
            await until(lambda: inspect(config.agent.data_dir).events == 0)
            await until(lambda: agent.uplink is not None and agent.uplink.status.delivered == 50)
            samples = await scrape(agent.metrics_port)
        sink_samples = await scrape(sink.metrics_port)
    assert value(samples, "edge_agent_accepted_events_total") == 50
    assert value(samples, "edge_agent_delivered_events_total") == 50
    assert value(samples, "edge_agent_uplink_state", state="online") == 1
    assert value(samples, "edge_agent_uplink_connections_total") == 1
    assert value(samples, "edge_agent_uplink_failures_total") == 0
    assert value(samples, "edge_agent_uplink_inflight_messages") == 0  # all delivered
    assert with_name(samples, "edge_agent_backlog_events") == {}
    assert value(samples, "edge_agent_uplink_certificate_expiry_timestamp_seconds") > 0
    assert value(samples, "edge_agent_uplink_token_expiry_timestamp_seconds") > 0
    forwarded = "cloud_sink_forwarded_events_total"
    assert value(sink_samples, forwarded, backend="sqlite", outcome="stored") == 50
    assert value(sink_samples, forwarded, backend="sqlite", outcome="duplicate") == 0


# -- the sink -------------------------------------------------------------------------------------


def sink_config(tmp_path: Path, pki: Pki) -> SinkConfig:
    return parse_sink_config(write_sink_config(tmp_path, pki).read_text() + METRICS)


async def refused_connect(port: int, pki: Pki, device: DeviceCreds) -> int:
    """CONNECT with a password that is no JWT; returns the CONNACK code."""
    client = await RawClient.open(port, ssl_context=pki.client_context(device))
    try:
        await client.send(
            connect_packet(device.device_id, username=device.device_id, password=b"not-a-jwt")
        )
        connack = await client.read(10)
        assert connack is not None
        return connack.body[1]
    finally:
        await client.aclose()


async def test_sink_counts_forwarded_duplicates_refusals(tmp_path: Path, pki: Pki) -> None:
    device = pki.device(f"ms-{uuid.uuid4().hex[:6]}")
    topic = f"devices/{device.device_id}/t"
    async with Sink(sink_config(tmp_path, pki)) as sink:
        port = sink.metrics_port
        before = await scrape(port)
        assert value(before, "cloud_sink_core_queue_up", backend="sqlite") == 1
        assert value(before, "cloud_sink_ready") == 1
        assert value(before, "cloud_sink_connections") == 0
        # 20 raw events at QoS 1 and 2.
        async with aiomqtt.Client(
            "localhost", sink.port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=pki.client_context(device),
        ) as client:  # fmt: skip
            for i in range(20):
                await client.publish(topic, f"{i}".encode(), qos=1 + i % 2)
            during = await scrape(port)
        # One batch envelope of 3 events, sent twice: the second time all 3 are duplicates.
        raw = await RawClient.open(sink.port, ssl_context=pki.client_context(device))
        try:
            username = format_username(device.device_id, format=FORMAT_BATCH_V1)
            password = device_token(device).encode()
            await raw.send(connect_packet(device.device_id, username=username, password=password))
            connack = await raw.read(10)
            assert connack is not None
            assert connack.body[1] == 0
            envelope = encode("0123456789abcdef", [EnvelopeEvent(s, s, b"e") for s in (1, 2, 3)])
            for packet_id in (1, 2):
                await raw.send(publish_packet(topic, envelope, qos=1, packet_id=packet_id))
                assert await raw.read(10) is not None  # PUBACK
            # An unmappable topic level: acknowledged into the dead letters, its 3 events each.
            await raw.send(publish_packet(f"{topic}/a.b", envelope, qos=1, packet_id=3))
            assert await raw.read(10) is not None
        finally:
            await raw.aclose()
        code = await refused_connect(sink.port, pki, device)
        assert code != ConnackCode.ACCEPTED
        after = await scrape(port)
    forwarded = "cloud_sink_forwarded_events_total"
    assert value(during, "cloud_sink_connections") == 1
    assert value(after, forwarded, backend="sqlite", outcome="stored") == 23
    assert value(after, forwarded, backend="sqlite", outcome="duplicate") == 3
    assert value(after, forwarded, backend="sqlite", outcome="dead_letter") == 3
    assert value(after, "cloud_sink_events_acked_total") == 23
    refused = with_name(after, "cloud_sink_connections_refused_total")
    assert refused == {frozenset({("reason", "malformed token")}): 1}
    assert value(after, "cloud_sink_connects_accepted_total") == 2
    assert value(after, "cloud_sink_core_queue_outages_total", backend="sqlite") == 0
    assert value(after, "cloud_sink_core_queue_probes_total", backend="sqlite", outcome="ok") == 0
    confirms = value(
        after, "cloud_sink_core_queue_confirm_seconds_count", backend="sqlite", operation="publish"
    )
    # Raw events were batched (one backend call may hold several); the envelope went in twice.
    assert 3 <= confirms <= 22
    assert value(
        after, "cloud_sink_core_queue_confirm_seconds_count", backend="sqlite",
        operation="dead_letter",
    ) == 1  # fmt: skip
    assert value(after, "cloud_sink_core_queue_errors_total", backend="sqlite",
                 operation="publish") == 0  # fmt: skip
    figures("sink metrics", refused=dict(next(iter(refused))), confirms=confirms)


async def test_the_crl_next_update_is_exported(tmp_path: Path, pki: Pki) -> None:
    """Past its next update OpenSSL refuses every device: the time is there to alert on."""
    crl = tmp_path / "crl.pem"
    pki.ca.write_crl(crl, days=3)
    text = write_sink_config(tmp_path, pki).read_text().replace("[auth]", f'crl = "{crl}"\n[auth]')
    async with Sink(parse_sink_config(text + METRICS)) as sink:
        samples = await scrape(sink.metrics_port)
    expected = x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc
    assert expected is not None
    assert value(samples, "cloud_sink_tls_crl_next_update_timestamp_seconds") == (
        expected.timestamp()
    )
    async with Sink(sink_config(tmp_path, pki)) as sink:  # no CRL: no such series
        samples = await scrape(sink.metrics_port)
    assert not with_name(samples, "cloud_sink_tls_crl_next_update_timestamp_seconds")
    # The sqlite core queue's disk, to alert before its reserve turns into an outage.
    assert value(samples, "cloud_sink_core_queue_disk_reserve_bytes") == 64 * 1024**2
    assert value(samples, "cloud_sink_core_queue_disk_free_bytes") > 0


async def test_a_refused_connect_is_counted_under_its_reason(tmp_path: Path, pki: Pki) -> None:
    device = pki.device(f"mr-{uuid.uuid4().hex[:6]}")
    text = write_sink_config(tmp_path, pki, extra_auth=f'deny = ["{device.device_id}"]')
    async with Sink(parse_sink_config(text.read_text() + METRICS)) as sink:
        assert await refused_connect(sink.port, pki, device) == ConnackCode.NOT_AUTHORIZED
        samples = await scrape(sink.metrics_port)
    refused = "cloud_sink_connections_refused_total"
    assert with_name(samples, refused) == {frozenset({("reason", "device is on the deny list")}): 1}


async def test_two_sinks_in_one_process_keep_their_own_registries(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    device = pki.device(f"m2-{uuid.uuid4().hex[:6]}")
    async with (
        Sink(sink_config(tmp_path / "a", pki)) as one,
        Sink(sink_config(tmp_path / "b", pki)) as two,
    ):
        async with aiomqtt.Client(
            "localhost", one.port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=pki.client_context(device),
        ) as client:  # fmt: skip
            await client.publish(f"devices/{device.device_id}/t", b"1", qos=1)
        first, second = await scrape(one.metrics_port), await scrape(two.metrics_port)
    stored = {"backend": "sqlite", "outcome": "stored"}
    assert value(first, "cloud_sink_forwarded_events_total", **stored) == 1
    assert value(second, "cloud_sink_forwarded_events_total", **stored) == 0
    # Nothing went into prometheus-client's process-wide default registry.
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "cloud_sink_" not in default
    assert "edge_agent_" not in default


# -- the endpoint and the counters translation ----------------------------------------------------


async def test_endpoint_answers_only_get_metrics_and_stops_with_its_owner() -> None:
    registry = prometheus_client.CollectorRegistry()
    counters = Counters()
    counters.inc("events_acked", 2)
    registry.register(CountersCollector(counters, "t_", {}))
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("buffer closed")

    async with MetricsServer("127.0.0.1", 0, registry, refresh=refresh) as server:
        port = server.port
        assert value(await scrape(port), "t_events_acked_total") == 2
        # A failing refresh still serves what the collectors have.
        assert value(await scrape(port), "t_events_acked_total") == 2
        assert await asyncio.to_thread(http_get, port, "/") == (404, "not found\n")
        assert await asyncio.to_thread(http_get, port, "/metrics", "POST") == (
            405,
            "method not allowed\n",
        )
        assert await asyncio.to_thread(http_get, port, "/metrics", "HEAD") == (200, "")
        # A client sending half a request is not held: it gets 400 after the request deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        # OpenMetrics when asked for.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert b"application/openmetrics-text" in answer.split(b"\r\n\r\n", 1)[0]
        assert answer.rstrip().endswith(b"# EOF")
    assert calls == 4  # the scrapes: two GETs, HEAD, OpenMetrics; not the 404 or 405
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


async def raw_get(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_endpoint_is_not_held_by_idle_sockets_nor_broken_by_odd_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by review: MAX_CLIENTS sockets sending one byte each, reopened as they were
    dropped, kept every readiness probe out; an Accept header prometheus-client cannot parse
    got no answer and an ERROR traceback; a failing handler the same; and a stop with
    connections open logged a traceback per connection (Python 3.11)."""

    async def ok(request: Request) -> Response:
        return Response(200, b"ok\n")

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    routes = {b"/ok": ok, b"/broken": broken}
    async with HttpEndpoint("127.0.0.1", 0, routes, announce="test at {url}") as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CLIENTS)]
        for _, writer in idle:
            writer.write(b"G")
        await asyncio.sleep(0.1)
        answer = await raw_get(server.port, b"GET /ok HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        answer = await raw_get(server.port, b"GET /broken HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 500 "), answer
        late = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await asyncio.sleep(0.1)
    for _, writer in idle + late:
        writer.close()
    async with MetricsServer("127.0.0.1", 0, prometheus_client.CollectorRegistry()) as metrics:
        odd = b"GET /metrics HTTP/1.1\r\nAccept: text/plain; version=x.y\r\n\r\n"
        assert (await raw_get(metrics.port, odd)).startswith(b"HTTP/1.1 200 ")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["HTTP GET /broken failed"]


async def test_endpoint_announces_an_ipv6_url_with_brackets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_ingest")
    async with HttpEndpoint("::1", 0, {}, announce="test at {url}") as server:
        pass
    assert f"test at http://[::1]:{server.port}" in [r.getMessage() for r in caplog.records]


async def test_endpoint_takes_bare_line_feeds_and_answers_head_without_a_body() -> None:
    """A request ending its lines with a bare LF (`printf ... | nc`) waited 2 s for a 400;
    the 404 answer to a HEAD carried a body (HTTP forbids it)."""

    async def ok(request: Request) -> Response:
        return Response(200, b"ok\n")

    async with HttpEndpoint("127.0.0.1", 0, {b"/ok": ok}, announce="test at {url}") as server:
        started = asyncio.get_running_loop().time()
        answer = await raw_get(server.port, b"GET /ok HTTP/1.0\nHost: x\n\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b"\r\n\r\nok\n")
        assert asyncio.get_running_loop().time() - started < 1.5
        for path in (b"/ok", b"/nope"):
            answer = await raw_get(server.port, b"HEAD " + path + b" HTTP/1.1\r\n\r\n")
            assert answer.endswith(b"Connection: close\r\n\r\n"), answer  # no body


def test_counters_are_exported_by_spec_with_bounded_reasons() -> None:
    counters = Counters()
    specs = {
        "refused": CounterSpec("refused", "Refused.", "reason", zeros=("quota",)),
        "plain": CounterSpec("plain_things", "Plain.", const=(("backend", "x"),)),
    }
    collector = CountersCollector(counters, "p_", specs, max_label_values=2)
    for reason in ("a", "b", "c", "d"):
        counters.inc("refused", reason=reason)
    counters.inc("refused", 5, reason="a")
    counters.inc("plain", 3, reason="ignored")
    counters.inc("new-thing", reason="why")
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    body = prometheus_client.generate_latest(registry).decode()
    samples: Samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    # "quota" (a zero) and "a" were admitted first; the rest is "other", and stays there.
    assert with_name(samples, "p_refused_total") == {
        frozenset({("reason", "quota")}): 0,
        frozenset({("reason", "a")}): 6,
        frozenset({("reason", "other")}): 3,
    }
    assert value(samples, "p_plain_things_total", backend="x") == 3
    assert value(samples, "p_new_thing_total", reason="why") == 1


def test_metrics_config_validators(tmp_path: Path) -> None:
    base = f'[agent]\ndevice_id = "d"\ndata_dir = "{tmp_path}"\n[[topics]]\nfilter = "#"\n'
    assert parse_agent_config(base).metrics.port is None
    for bad, where in (
        ("port = 70000", "metrics.port"),
        ('backlog_refresh = "0s"', "metrics.backlog_refresh"),
        ("max_topics = 0", "metrics.max_topics"),
        ("colour = 1", "metrics.colour"),
    ):
        with pytest.raises(Exception, match=re.escape(where)):
            parse_agent_config(base + f"[metrics]\n{bad}\n")


async def test_an_expired_certificate_keeps_its_expiry_exported(tmp_path: Path, pki: Pki) -> None:
    """An agent started with an expired device certificate refused to connect and exported no
    expiry at all: the alert example on it (docs/metrics.md) had no series to fire on, for
    exactly the certificate that had expired."""
    device = pki.expired_device(f"me-{uuid.uuid4().hex[:6]}")
    path = write_config(
        tmp_path / "agent",
        device_id=device.device_id,
        uplink=uplink_section(pki, device, 1),  # refused before any connection is tried
        topics=TOPICS,
    )
    path.write_text(path.read_text() + AGENT_METRICS)
    config = load_config(path)
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        assert agent.uplink is not None
        uplink = agent.uplink
        await until(lambda: uplink.status.failures >= 1)
        samples = await scrape(agent.metrics_port)
    assert value(samples, "edge_agent_uplink_state", state="refused") == 1
    cert = x509.load_pem_x509_certificate(device.cert.read_bytes())
    expiry = value(samples, "edge_agent_uplink_certificate_expiry_timestamp_seconds")
    assert expiry == cert.not_valid_after_utc.timestamp()


async def test_a_buffer_full_by_count_is_seen_by_the_documented_alerts(tmp_path: Path) -> None:
    """Found by review: the only fill alert in docs/metrics.md was on bytes; with small events
    the buffer reaches max_events first and refused new events with that ratio near 0 (and a
    `reject` topic drops nothing, so the drop alert stayed quiet too)."""
    config = load_config(agent_config(tmp_path, buffer="max_events = 5"))
    async with Agent(config) as agent:
        assert agent.metrics_port is not None
        for _ in range(5):
            await agent.publish("sensors/a", b"12345")
        with pytest.raises(BufferFull):
            await agent.publish("sensors/a", b"x")  # `reject`: refused, nothing dropped
        samples = await scrape(agent.metrics_port)
    stored_bytes = value(samples, "edge_agent_buffer_bytes") + value(
        samples, "edge_agent_dead_letter_bytes"
    )
    assert stored_bytes / value(samples, "edge_agent_buffer_max_bytes") < 0.8  # quiet
    assert sum(with_name(samples, "edge_agent_dropped_events_total").values()) == 0  # quiet
    stored_events = value(samples, "edge_agent_buffer_events") + value(
        samples, "edge_agent_dead_letters"
    )
    assert stored_events / value(samples, "edge_agent_buffer_max_events") > 0.8  # fires
    docs = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    expression = (
        "(edge_agent_buffer_events + edge_agent_dead_letters) / edge_agent_buffer_max_events"
    )
    assert expression in docs
