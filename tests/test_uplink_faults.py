"""The uplink under faults: crashes in the drain (F1), poison events, refused credentials and
certificates on either side (F12, F13), clock skew and token expiry (F11), sink restarts (F4),
network cuts (F5) and SIGTERM (F19). The sink is real (in this process or a subprocess)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent import window as window_module
from edge_agent.accept import InvalidEvent
from edge_agent.buffer import (
    BufferError,
    BufferFull,
    StoredEvent,
    inspect,
    read_dead_letters,
    read_events,
)
from edge_agent.config import AgentConfig
from edge_agent.link import (
    REFUSAL_WINDOW,
    UNSENT_LIMIT,
    LinkFailure,
    LinkState,
)
from edge_agent.messages import Messages
from edge_agent.uplink import CRL_CHECK_INTERVAL
from mqtt_ingest import ConnectRequest, Identity, Refusal, failpoints
from tests.harness.agent import AGENT_READY, uplink_section, write_config
from tests.harness.chaos import ChaosProxyFactory, Direction
from tests.harness.clock import SkewedClock
from tests.harness.disk import free_bytes, small_disk
from tests.harness.mosquitto import free_port
from tests.harness.pki import Pki
from tests.harness.process import ManagedProcess, ProcessFactory, console_script
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink
from tests.harness.sink import sink_on_a_port
from tests.harness.stages import SlowStage, counters, running_server
from tests.harness.uplink import (
    acks_held,
    configure,
    counted_losses,
    link,
    new_device,
    preload,
    stored_payloads,
)
from tests.test_uplink import TOPICS

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def agent_process(
    processes: ProcessFactory, path: Path, env: dict[str, str] | None = None
) -> ManagedProcess:
    return processes(
        [console_script("edge-agent"), "--config", str(path), "run", "--listen-port", "{port}"],
        ready=AGENT_READY,
        name="edge-agent",
        env=env,
        start=False,
    )


@pytest.mark.parametrize(
    "failpoint",
    [
        "drain.before_publish",
        "drain.after_publish_before_puback",
        "drain.after_puback_before_delete",
    ],
)
async def test_kill9_in_the_drain_loses_nothing_and_the_sink_dedupes(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory, failpoint: str
) -> None:
    device = new_device(pki, "f1")
    async with sink(tmp_path, pki) as server:
        # Batch envelopes of 5: event ids come from the agent, so the sink can dedupe resends.
        path = configure(
            tmp_path, pki, device, server.port, extra="window = 4\nbatch.max_events = 5"
        )
        config = load_config(path)
        await preload(config, 200)
        agent = agent_process(process_factory, path, {"BRIDGE_FAILPOINTS": f"{failpoint}=kill9@20"})
        await agent.astart()
        assert await agent.await_exit(timeout=60) == -9
        before = len(stored_payloads(tmp_path / "core.db"))
        agent.env.pop("BRIDGE_FAILPOINTS")
        await agent.astart()
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
        assert await agent.asigterm() == 0
    stored = stored_payloads(tmp_path / "core.db")
    figures(
        failpoint, events=200, before_crash=before, stored=len(stored), lost=200 - len(set(stored))
    )
    assert sorted(stored) == list(range(200))  # each once: the resend was deduplicated


async def test_a_poison_event_goes_to_dead_letters_and_the_rest_flows(
    tmp_path: Path, pki: Pki
) -> None:
    """The sink closes the connection on a packet over its size limit: that event is poison."""
    device = new_device(pki, "poison")
    async with sink(tmp_path, pki, listener_extra='max_packet_size = "2KiB"') as server:
        path = configure(tmp_path, pki, device, server.port, extra="max_attempts = 3")
        config = load_config(path)
        sent = 0
        async with Agent(config) as agent:
            for _ in range(5):
                await agent.publish("sensors/t", f"{sent}".encode())
                sent += 1
            await agent.publish("sensors/big", b"x" * 8000)
            assert agent.uplink is not None
            while agent.uplink.status.dead_lettered == 0:  # the sensors keep publishing
                await agent.publish("sensors/t", f"{sent}".encode())
                sent += 1
                await asyncio.sleep(0.05)
                assert sent < 1000, "the poison event was never dead-lettered"
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            connections = agent.uplink.status.connections
    stats = inspect(config.agent.data_dir)
    assert stats.dead_letters == 1
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(sent))
    figures("poison", events=sent + 1, connections=connections, dead_letters=stats.dead_letters)


async def test_poison_counts_are_kept_across_restarts(tmp_path: Path, pki: Pki) -> None:
    """Each run of the agent ends right after a loss counted against the poison event. The count
    was kept in memory only: it started over at every start, and an agent restarted that often
    never dead-lettered the event."""
    device = new_device(pki, "poison-restarts")
    async with sink(tmp_path, pki, listener_extra='max_packet_size = "2KiB"') as server:
        path = configure(tmp_path, pki, device, server.port, extra="max_attempts = 3")
        config = load_config(path)
        data = config.agent.data_dir
        sent = runs = 0
        poison: int | None = None
        counts: list[int] = []
        while runs < 5:
            runs += 1
            async with Agent(config) as agent:
                assert agent.uplink is not None
                if poison is None:
                    poison = int((await agent.publish("sensors/big", b"x" * 8000)).split("/")[-1])
                before = counted_losses(data, poison)
                deadline = time.monotonic() + 60
                # (The buffer, not status.dead_lettered: the dead letter's commit drops its
                # count before the uplink counts it, and the next run then waited 60 s for a
                # loss of an event already dead-lettered.)
                while counted_losses(data, poison) == before:
                    if inspect(data).dead_letters:
                        break
                    await agent.publish("sensors/t", f"{sent}".encode())
                    sent += 1
                    await asyncio.sleep(0.05)
                    status = agent.uplink.status
                    assert time.monotonic() < deadline, (
                        f"run {runs}: no loss counted against the poison event in 60 s"
                        f" ({status.failures} failures, last: {status.last_error})"
                    )
                counts.append(counted_losses(data, poison))
                if inspect(data).dead_letters:
                    await until(lambda: inspect(data).events == 0, timeout=60)
                    break
    figures("poison across restarts", runs=runs, counts=counts, events=sent + 1)
    stats = inspect(data)
    assert (runs, stats.dead_letters, stats.events) == (3, 1, 0)
    assert counts == [1, 2, 0]  # the dead letter's row goes with it
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(sent))


async def test_a_failed_delete_does_not_count_against_the_event_in_flight(
    tmp_path: Path, pki: Pki
) -> None:
    """Found by review: a delete of acknowledged rows that failed (F7, a flaky disk) ended the
    connection with the failure the uplink reads as the server closing it on the event alone in
    flight: a healthy event was set aside, counted, and with two such failures dead-lettered
    (the sink had stored it twice). The buffer's failure counts against no event now. The
    failing deletes are injected at the buffer's API, which the uplink calls."""
    stage = SlowStage(0.3)  # so that the next event is in flight when a delete fails
    async with running_server(stage, ssl_context=pki.server_context()) as server:
        device = new_device(pki, "delete-fails")
        extra = 'format = "raw"\nwindow = 1\nmax_attempts = 2'
        path = write_config(
            tmp_path / "agent",
            device_id=device.device_id,
            uplink=uplink_section(pki, device, server.port, extra=extra),
            topics='[[topics]]\nfilter = "#"\nqos = 1\n',
        )
        config = load_config(path)
        data = config.agent.data_dir
        async with Agent(config) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            delete = agent.buffer.delete
            calls: list[list[int]] = []

            async def failing_now_and_then(
                seqs: Sequence[int], *, drop_reason: str | None = None
            ) -> int:
                calls.append(list(seqs))
                if len(calls) in (1, 3):  # a disk short of room for a moment, twice
                    raise BufferError("disk I/O error")
                return await delete(seqs, drop_reason=drop_reason)

            agent.buffer.delete = failing_now_and_then  # type: ignore[method-assign]
            await agent.publish_many(
                [("sensors/t", b"e1"), ("sensors/t", b"e2"), ("sensors/t", b"e3")]
            )
            await until(lambda: inspect(data).events == 0 or status.dead_lettered > 0, timeout=30)
            failures = status.failures
    dead = read_dead_letters(data)
    figures("failed deletes", deletes=calls, failures=failures, dead_letters=len(dead))
    assert len(calls) >= 4
    assert failures == 2
    assert dead == []  # e2 is healthy: the server acknowledges it
    assert (inspect(data).events, set(stage.payloads())) == (0, {b"e1", b"e2", b"e3"})


async def test_a_topic_too_long_for_the_uplink_is_refused_or_dead_lettered(
    tmp_path: Path, pki: Pki
) -> None:
    """The door checked the local topic against MQTT's 65,535 bytes, not the uplink topic the
    template makes of it: such an event was accepted, paho refused to publish it, and every
    connection failed on it for ever, delivering nothing behind it. Now the door refuses it;
    one buffered before (by an agent without uplink, or another template) is dead-lettered."""
    long_topic = "sensors/" + "x" * 65510
    device = new_device(pki, "long-topic")
    size = len(f"devices/{device.device_id}/{long_topic}")
    async with sink(tmp_path, pki) as server:
        config = load_config(configure(tmp_path, pki, device, server.port, extra='format = "raw"'))
        async with Agent(config.model_copy(update={"uplink": None})) as offline:
            await offline.publish(long_topic, b"buffered before")
            await offline.publish("sensors/t", b"0")
        async with Agent(config) as agent:
            with pytest.raises(InvalidEvent, match=f"would be {size} bytes, over MQTT's 65535"):
                await agent.publish(long_topic, b"refused")
            await agent.publish("sensors/t", b"1")
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            assert agent.uplink is not None
            status = agent.uplink.status
            assert (status.dead_lettered, status.failures) == (1, 0)
    [dead] = read_dead_letters(config.agent.data_dir)
    assert (dead.topic, dead.reason) == (
        long_topic,
        f"its uplink topic is {size} bytes, over MQTT's 65535",
    )
    assert sorted(stored_payloads(tmp_path / "core.db")) == [0, 1]


async def test_a_buffered_event_whose_uplink_topic_has_a_dot_level_is_dead_lettered(
    tmp_path: Path, pki: Pki
) -> None:
    """Noticed by review: the door now refuses a topic that the template makes into a '..'
    level, but one buffered before (an older agent, another template) was still sent, and the
    sink closed the link on it as a rights violation, connection after connection, until the
    poison count dead-lettered it. The drain dead-letters it at once, as a too-long one."""
    device = new_device(pki, "dot-level")
    template = 'topic_template = "devices/{device_id}/%{topic}"'
    async with sink(tmp_path, pki) as server:
        config = load_config(configure(tmp_path, pki, device, server.port, extra=template))
        async with Agent(config.model_copy(update={"uplink": None})) as offline:
            await offline.publish("2e%2e/x", b"buffered before")
            await offline.publish("ok", b"0")
        async with Agent(config) as agent:
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            assert agent.uplink is not None
            status = agent.uplink.status
            assert (status.dead_lettered, status.failures) == (1, 0)
    [dead] = read_dead_letters(config.agent.data_dir)
    sent = f"devices/{device.device_id}/%2e%2e/x"
    assert (dead.topic, dead.reason.split(": ")[0]) == (
        "2e%2e/x",
        f"its uplink topic {sent!r} cannot be sent",
    )
    assert sorted(stored_payloads(tmp_path / "core.db")) == [0]


async def test_requeue_dead_puts_dead_letters_back(tmp_path: Path, pki: Pki) -> None:
    from tests.harness.agent_cli import acli

    device = new_device(pki, "requeue")
    path = configure(tmp_path, pki, device, 1)
    config = load_config(path)
    await preload(config, 3)
    async with Agent(config.model_copy(update={"uplink": None})) as agent:
        assert await agent.buffer.dead_letter(2, "test")
    assert inspect(config.agent.data_dir).dead_letters == 1
    done = await acli(path, "buffer", "requeue-dead")
    assert done.returncode == 0, done.stderr
    assert "requeued 1" in done.stderr
    stats = inspect(config.agent.data_dir)
    assert (stats.events, stats.dead_letters) == (3, 0)


@pytest.mark.parametrize("kind", ["revoked", "foreign", "expired"])
async def test_client_certificate_refused_keeps_buffering_and_retries_slowly(
    tmp_path: Path, pki: Pki, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    device_id = f"f12-{kind}-{uuid.uuid4().hex[:6]}"
    device = {
        "revoked": pki.revoked_device,
        "foreign": pki.foreign_device,
        "expired": pki.expired_device,
    }[kind](device_id)
    async with sink(tmp_path, pki, listener_extra=f'crl = "{pki.crl}"') as server:
        config = load_config(
            configure(tmp_path, pki, device, server.port, extra='connect_timeout = "2s"')
        )
        async with Agent(config) as agent:
            for i in range(10):
                await agent.publish("sensors/t", f"{i}".encode())
            await until(lambda: link(config) is LinkState.REFUSED, timeout=30)
            await asyncio.sleep(2.5)  # a few slow retries
            assert agent.uplink is not None
            detail = agent.uplink.status.last_error
            assert inspect(config.agent.data_dir).events == 10
    refusals = [r for r in caplog.records if "uplink: refused" in r.getMessage()]
    figures(f"client certificate {kind}", buffered=10, refusal_log_lines=len(refusals))
    assert len(refusals) == 1, "a refusal is logged once, not per attempt"
    assert "certificate" in detail.lower() or "unknown ca" in detail.lower(), detail
    assert not (tmp_path / "core.db").exists() or not stored_payloads(tmp_path / "core.db")


@pytest.mark.parametrize("kind", ["wrong-san", "expired", "other-ca"])
async def test_bad_server_certificate_is_refused_without_fallback(
    tmp_path: Path, pki: Pki, kind: str
) -> None:
    if kind == "wrong-san":
        issued = pki.server(f"wrong-{uuid.uuid4().hex[:6]}", ["other.example"])
        cert, key = issued.cert_path, issued.key_path
    elif kind == "expired":
        import datetime as dt

        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        issued = pki.server(f"old-{uuid.uuid4().hex[:6]}", ["localhost"], ["127.0.0.1"],
                            days=1, not_before=start)  # fmt: skip
        cert, key = issued.cert_path, issued.key_path
    else:
        issued = pki.other_ca.issue_server(
            ["localhost"], ["127.0.0.1"], name=f"x-{uuid.uuid4().hex[:6]}"
        )
        cert, key = issued.cert_path, issued.key_path
    device = new_device(pki, "f13")
    async with sink(tmp_path, pki, server_cert=(cert, key)) as server:
        config = load_config(configure(tmp_path, pki, device, server.port))
        async with Agent(config) as agent:
            await agent.publish("sensors/t", b"1")
            await until(lambda: link(config) is LinkState.REFUSED, timeout=30)
            assert agent.uplink is not None
            detail = agent.uplink.status.last_error
            assert agent.uplink.status.connections == 0
    assert "CERTIFICATE_VERIFY_FAILED" in detail, detail
    assert inspect(config.agent.data_dir).events == 1
    assert not stored_payloads(tmp_path / "core.db")


def with_crl(path: Path, crl: Path) -> Path:
    path.write_text(path.read_text().replace("[uplink.tls]\n", f'[uplink.tls]\ncrl = "{crl}"\n'))
    return path


async def test_a_revoked_sink_certificate_is_refused_once_the_crl_lists_it(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """[uplink.tls] crl: the agent checks the sink's server certificate against the CA's CRL,
    and reads the file again when it changes. Online with a CRL that does not list the sink's
    certificate; the certificate is revoked and the new CRL copied in: the agent leaves the
    connection it has and is refused at the next (slow retries, events kept); a sink with a
    good certificate gets everything. The older CRL put back (a backup, a rolled-back
    deployment) is not taken: it let the revoked sink in again."""
    caplog.set_level(logging.WARNING, logger="edge_agent.tls")
    issued = pki.server(f"sink-{uuid.uuid4().hex[:6]}", ["localhost"], ["127.0.0.1"])
    crl = tmp_path / "crl.pem"
    shutil.copyfile(pki.crl, crl)
    older = shutil.copyfile(pki.crl, tmp_path / "older.pem")
    device = new_device(pki, "crl")
    port = free_port()
    path = with_crl(configure(tmp_path, pki, device, port), crl)
    config = load_config(path)
    server_cert = (issued.cert_path, issued.key_path)
    async with Agent(config) as agent:
        assert agent.uplink is not None
        uplink = agent.uplink
        async with sink(tmp_path, pki, port=port, server_cert=server_cert):
            await agent.publish("sensors/t", b"0")
            await until(lambda: stored_payloads(tmp_path / "core.db") == [0], timeout=30)
            pki.ca.revoke(f"{issued.serial:x}")
            shutil.copyfile(pki.crl, crl)  # the same sink, still running
            await until(lambda: uplink.status.state is LinkState.REFUSED, timeout=30)
            detail = uplink.status.last_error
            os.replace(older, crl)
            await until(lambda: "changed to an older one" in caplog.text, timeout=30)
            failures = uplink.status.failures
            await until(lambda: uplink.status.failures > failures, timeout=30)
            assert "certificate revoked" in uplink.status.last_error
            await agent.publish("sensors/t", b"1")
        async with sink(tmp_path, pki, port=port):  # the session's good certificate
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
    assert "certificate revoked" in detail, detail
    assert sorted(stored_payloads(tmp_path / "core.db")) == [0, 1]


async def test_an_expired_or_foreign_crl_refuses_the_sink_and_says_why(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRL past its next update (OpenSSL would refuse every server against it): connections
    are refused, said with the file and the reason, events kept. Another CA's CRL copied over
    it is not taken (one warning; the previous one stays). A fresh one is read at the next
    attempt and everything is delivered."""
    crl = pki.ca.write_crl(tmp_path / "crl.pem", days=10 / 86400)
    expires = time.monotonic() + 10
    device = new_device(pki, "crlx")
    port = free_port()
    config = load_config(with_crl(configure(tmp_path, pki, device, port), crl))
    async with Agent(config) as agent:
        assert agent.uplink is not None
        uplink = agent.uplink
        async with sink(tmp_path, pki, port=port):
            await agent.publish("sensors/t", b"0")
            await until(lambda: stored_payloads(tmp_path / "core.db") == [0], timeout=9)
        await agent.publish("sensors/t", b"1")
        await until(lambda: "expired at" in uplink.status.last_error, timeout=30)
        assert time.monotonic() >= expires - 1  # whole seconds in the CRL
        expired = uplink.status.last_error
        assert uplink.status.state is LinkState.REFUSED
        shutil.copyfile(pki.other_ca.write_crl(tmp_path / "foreign.pem"), crl)
        await until(lambda: "the CRL changed but cannot be used" in caplog.text, timeout=30)
        assert uplink.status.last_error == expired
        async with sink(tmp_path, pki, port=port):
            shutil.copyfile(pki.ca.write_crl(tmp_path / "fresh.pem"), crl)
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            # The same CRL written again (a periodic fetch): no reconnect for it.
            connections = uplink.status.connections
            os.utime(crl)
            await asyncio.sleep(CRL_CHECK_INTERVAL + 1.5)
            assert uplink.status.connections == connections
    assert "fetch a fresh one" in expired, expired
    assert "not signed by the CA" in caplog.text
    assert sorted(stored_payloads(tmp_path / "core.db")) == [0, 1]


async def test_a_fresh_crl_ends_a_slow_back_off_when_none_was_usable_at_start(
    tmp_path: Path, pki: Pki
) -> None:
    """Started with an expired CRL, the agent never loaded its TLS material and backs off slowly
    (60 s here). A fresh CRL copied in is tried at once, not after that back-off."""
    crl = pki.ca.write_crl(tmp_path / "crl.pem", days=1 / 86400)
    await asyncio.sleep(1.5)
    device = new_device(pki, "crl0")
    async with sink(tmp_path, pki) as server:
        path = with_crl(configure(tmp_path, pki, device, server.port), crl)
        text = path.read_text().replace(
            'refused_backoff_initial = "1s"', 'refused_backoff_initial = "60s"'
        )
        path.write_text(text.replace('refused_backoff_max = "2s"', 'refused_backoff_max = "120s"'))
        config = load_config(path)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await agent.publish("sensors/t", b"1")
            await until(lambda: uplink.status.state is LinkState.REFUSED, timeout=30)
            shutil.copyfile(pki.ca.write_crl(tmp_path / "fresh.pem"), crl)
            started = time.monotonic()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            waited = time.monotonic() - started
            # Accepted at last: a later refusal starts the slow back-off over (it went on from
            # where these refusals had left it).
            refusals_counted = uplink._refused_backoff.failures
    figures("fresh CRL after an unusable one", waited_s=round(waited, 1))
    assert refusals_counted == 0
    assert waited < CRL_CHECK_INTERVAL + 5
    assert stored_payloads(tmp_path / "core.db") == [1]


async def test_a_new_crl_during_a_certificate_rotation_is_read_once_the_files_are_whole(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A new CRL is loaded with the rest of the TLS files. Caught while the certificate file is
    half written, it used to be blamed for the failure and not read again until it changed; now
    it waits for the files and is loaded (and the sink checked against it) once they are whole."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    crl = tmp_path / "crl.pem"
    shutil.copyfile(pki.crl, crl)
    device = new_device(pki, "crlrot")
    async with sink(tmp_path, pki) as server:
        config = load_config(with_crl(configure(tmp_path, pki, device, server.port), crl))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connections == 1, timeout=30)
            whole = device.cert.read_bytes()
            device.cert.write_bytes(whole[: len(whole) // 2])
            shutil.copyfile(pki.ca.write_crl(tmp_path / "newer.pem"), crl)
            await until(lambda: "waits for the TLS files" in caplog.text, timeout=30)
            assert uplink.status.connections == 1
            device.cert.write_bytes(whole)
            await until(lambda: uplink.status.connections == 2, timeout=30)
    assert "the CRL changed but cannot be used" not in caplog.text
    assert "loaded (changed on disk)" in caplog.text


@pytest.mark.parametrize(
    ("skew", "refused_by"),
    [(600, "sink"), (63, "sink"), (57, None), (-57, None), (-63, "sink"), (-600, "agent")],
    ids=["+10min", "+63s", "+57s", "-57s", "-63s", "-10min"],
)
async def test_clock_skew_against_the_leeway(
    tmp_path: Path,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    skew: int,
    refused_by: str | None,
) -> None:
    """RELIABILITY F11 with a 60 s leeway (JWT times are whole seconds: 61 s is on the rounding
    edge, so 63 and 57). A clock ahead by more mints tokens "issued in the future", one behind
    by more tokens issued too long ago for a token minted for this CONNECT: the sink refuses
    them (accepted, a clock behind would have its connections cut at exp before it renews). A
    clock 10 minutes behind finds its new certificate not valid yet (bridge-certs backdates by
    5 minutes) and does not even try. Either way: said once however often retried, the agent
    buffering on, and all delivered once the clock is right. Within the leeway: accepted."""
    device = new_device(pki, "f11")
    clock = SkewedClock(skew)
    async with sink(tmp_path, pki, extra_auth='leeway = "60s"') as server:
        config = load_config(configure(tmp_path, pki, device, server.port))
        async with Agent(config, clock=clock) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            for i in range(5):
                await agent.publish("sensors/t", f"{i}".encode())
            if refused_by is not None:
                # Retried (slowly), and said to be refused between attempts: with full jitter
                # the next attempt (CONNECTING) may start at once, so wait for both.
                await until(
                    lambda: status.failures >= 3 and link(config) is LinkState.REFUSED, timeout=30
                )
                await agent.publish("sensors/t", b"5")  # still accepted: the buffer takes it
                assert inspect(config.agent.data_dir).events == 6
                said = [r for r in caplog.records if "uplink: refused" in r.getMessage()]
                assert len(said) == 1, [r.getMessage() for r in said]
                clock.offset = 0  # the clock is put right
            else:
                await agent.publish("sensors/t", b"5")
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            failures = status.failures
        refusals = counters(server).get("connections_refused")
    figures(f"clock skew {skew:+d} s", sink_refusals=refusals, agent_failures=failures)
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(6))
    assert (refusals > 0) is (refused_by == "sink")
    assert (failures > 0) is (refused_by is not None)


async def test_connection_renewed_before_the_token_expires(tmp_path: Path, pki: Pki) -> None:
    """Short tokens: the agent reconnects with a fresh one before the sink would cut it."""
    device = new_device(pki, "renew")
    async with sink(tmp_path, pki, extra_auth='leeway = "1s"') as server:
        config = load_config(
            configure(
                tmp_path,
                pki,
                device,
                server.port,
                token='audience = "sink.test"\nlifetime = "4s"\nrenew_before = "2s"',
            )
        )
        sent = 0
        async with Agent(config) as agent:
            end = asyncio.get_running_loop().time() + 9
            while asyncio.get_running_loop().time() < end:
                await agent.publish("sensors/t", f"{sent}".encode())
                sent += 1
                await asyncio.sleep(0.01)
            await until(lambda: inspect(config.agent.data_dir).events == 0)
            assert agent.uplink is not None
            connections = agent.uplink.status.connections
        expired = counters(server).get("connections_closed", "expired")
    figures("token renewal", events=sent, connections=connections, closed_by_sink_at_exp=expired)
    assert connections >= 3
    assert expired == 0
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(sent))


@pytest.mark.parametrize("behind", [1, 7])
async def test_a_clock_behind_is_never_cut_at_exp_before_it_renews(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, behind: int
) -> None:
    """RELIABILITY F11 "mid-session expiry: the agent renews first", scaled down: lifetime 8 s,
    renew_before 3 s, leeway 3 s. The agent renews at exp - 3 s on its clock, the sink closes at
    exp + 3 s on its own: a clock more than 6 s behind (at 1 h / 5 min / 30 s: 330 s) was
    accepted and cut at exp every time. Within the leeway (1 s behind) it connects and renews
    before the sink's close; beyond it (7 s) the sink refuses the CONNECT, saying the device
    clock is behind, and the agent keeps buffering; all is delivered once the clock is right."""
    device = new_device(pki, "skewren")
    clock = SkewedClock(-behind)
    async with sink(tmp_path, pki, extra_auth='leeway = "3s"') as server:
        config = load_config(
            configure(
                tmp_path, pki, device, server.port,
                token='audience = "sink.test"\nlifetime = "8s"\nrenew_before = "3s"',
            )
        )  # fmt: skip
        sent = 0
        async with Agent(config, clock=clock) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            end = asyncio.get_running_loop().time() + 12
            while asyncio.get_running_loop().time() < end:
                await agent.publish("sensors/t", f"{sent}".encode())
                sent += 1
                await asyncio.sleep(0.01)
            if behind > 3:
                assert status.connections == 0
                assert status.state in (LinkState.REFUSED, LinkState.CONNECTING)
                assert inspect(config.agent.data_dir).events == sent  # buffered, all of it
                clock.offset = 0  # the clock is put right
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            connections = status.connections
        expired = counters(server).get("connections_closed", "expired")
        refused = counters(server).get("connections_refused", "token issued too long ago")
    figures(
        f"clock {behind} s behind, renewal", events=sent, connections=connections,
        closed_by_sink_at_exp=expired, refused_for_the_clock=refused,
    )  # fmt: skip
    assert expired == 0, "the sink cut the connection at exp before the agent renewed"
    assert sorted(stored_payloads(tmp_path / "core.db")) == list(range(sent))
    if behind > 3:
        assert refused > 0
        assert "the device clock is behind?" in caplog.text
    else:
        assert connections >= 2  # renewed
        assert refused == 0


@pytest.mark.parametrize("cut", ["reset", "close", "blackhole"])
async def test_network_cuts_lose_nothing(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, cut: str
) -> None:
    device = new_device(pki, "f5")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        config = load_config(
            configure(tmp_path, pki, device, proxy.port, extra="keepalive = 4\nwindow = 8")
        )
        sent = 0
        async with Agent(config) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            for round_ in range(3):
                for _ in range(100):
                    await agent.publish("sensors/t", f"{sent}".encode())
                    sent += 1
                await until(lambda: status.connected_since is not None)  # online again
                loop = asyncio.get_running_loop()
                started = loop.time()
                if cut == "blackhole":
                    proxy.blackhole()
                    await until(lambda: status.connected_since is None, timeout=10)
                    detected = loop.time() - started
                    figures("blackhole detected", round=round_, seconds=round(detected, 1))
                    # F5: within 1.5 x keep-alive (paho alone took up to 2 x + 1 s), plus the
                    # watchdog's check interval (0.75 s here).
                    assert detected <= 1.5 * 4 + 1.0
                    proxy.pass_through()
                else:
                    await (proxy.reset() if cut == "reset" else proxy.close())
                    await until(lambda: link(config) is LinkState.BACKOFF, timeout=10)
                    await asyncio.sleep(0.5)  # new connections are cut too, for a while
                    proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
    stored = stored_payloads(tmp_path / "core.db")
    figures(f"network {cut}", events=sent, stored=len(stored), lost=sent - len(set(stored)))
    assert sorted(stored) == list(range(sent))


@pytest.mark.parametrize("seconds", [1.0, 30.0])
async def test_blackholes_short_and_long_lose_nothing(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, seconds: float
) -> None:
    """RELIABILITY F5, blackhole for 1 s and for 30 s while events keep coming. 1 s is under the
    keep-alive: nothing notices, no reconnect. 30 s: both sides drop the connection (the sink by
    its keep-alive), the agent keeps trying into the blackhole, then drains all once it heals."""
    device = new_device(pki, "f5b")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'keepalive = 4\nwindow = 8\nconnect_timeout = "3s"'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        sent = 0
        async with Agent(config) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status

            async def publish_for(duration: float) -> None:
                nonlocal sent
                end = asyncio.get_running_loop().time() + duration
                while asyncio.get_running_loop().time() < end:
                    await agent.publish("sensors/t", f"{sent}".encode())
                    sent += 1
                    await asyncio.sleep(0.02)

            await until(lambda: status.connected_since is not None)
            await publish_for(1.0)
            proxy.blackhole()
            await publish_for(seconds)
            held = inspect(config.agent.data_dir).events
            proxy.pass_through()
            await publish_for(1.0)
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            connections, failures = status.connections, status.failures
        keep_alive_closes = counters(server).get("connections_closed", "keep_alive")
    stored = stored_payloads(tmp_path / "core.db")
    figures(
        f"blackhole {seconds:g} s", events=sent, lost=sent - len(set(stored)), held_during=held,
        connections=connections, failed_attempts=failures, sink_keep_alive_closes=keep_alive_closes,
    )  # fmt: skip
    assert sorted(set(stored)) == list(range(sent))
    assert held > 8, "nothing piled up beyond the window: the blackhole did not bite"
    if seconds < 4:
        assert (connections, failures, keep_alive_closes) == (1, 0, 0)
    else:
        assert keep_alive_closes == 1  # the sink's side noticed too (1.5 x keep-alive)
        assert failures >= 3  # attempts into the blackhole, none of them hanging for ever
        assert connections >= 2


async def test_sink_killed_and_restarted_under_load(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """F4: kill -9 and a graceful restart of a sink process while the agent streams to it."""
    port, sink_process = sink_on_a_port(tmp_path, pki, process_factory)
    await sink_process.astart()
    device = new_device(pki, "f4")
    config = load_config(configure(tmp_path, pki, device, port))
    sent = 0

    async def publish(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            await agent.publish("sensors/t", f"{sent}".encode())
            sent += 1
            await asyncio.sleep(0.002)

    async with Agent(config) as agent:
        await publish(300)
        sink_process.kill9()
        await publish(200)
        await sink_process.astart()
        await publish(300)
        assert await sink_process.asigterm() == 0  # SIGTERM under load: a clean exit
        await publish(200)
        await sink_process.astart()
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
        assert agent.uplink is not None
        connections = agent.uplink.status.connections
    stored = stored_payloads(tmp_path / "core.db")
    figures("sink restarts", events=sent, stored=len(stored), connections=connections)
    assert sorted(stored) == list(range(sent))
    assert connections >= 3


async def test_a_full_disk_refuses_new_events_and_still_drains(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """F7 at the agent on a real small disk (a tmpfs), filled while the sink is away: new events
    are refused with a clear reason once only the disk reserve is left, everything accepted
    drains when the sink is back, and the agent takes events again by itself."""
    port, sink_process = sink_on_a_port(tmp_path, pki, process_factory)
    device = new_device(pki, "f7")
    accepted: list[int] = []

    async def publish(agent: Agent, numbers: range) -> list[BufferFull]:
        async def one(number: int) -> None:
            await agent.publish("sensors/t", f"{number}".encode().ljust(2000))
            accepted.append(number)

        outcomes = await asyncio.gather(*map(one, numbers), return_exceptions=True)
        assert all(o is None or isinstance(o, BufferFull) for o in outcomes), outcomes
        return [o for o in outcomes if isinstance(o, BufferFull)]

    with small_disk(tmp_path / "disk", 12 * 1024**2) as disk:
        path = write_config(
            disk / "agent",
            device_id=device.device_id,
            buffer='disk_reserve = "3MiB"\ncommit_linger = 0',
            uplink=uplink_section(pki, device, port),
            topics=TOPICS,
        )
        config = load_config(path)
        async with Agent(config) as agent:
            refused: list[BufferFull] = []
            sent = 0
            while not refused:
                refused = await publish(agent, range(sent, sent + 100))
                sent += 100
            full = free_bytes(disk)
            await sink_process.astart()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            again = await publish(agent, range(sent, sent + 300))
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
        assert await sink_process.asigterm() == 0
    stored = stored_payloads(tmp_path / "core.db")
    figures(
        "agent on a full disk",
        accepted=len(accepted),
        refused=sent - len(accepted) + 300,
        free_when_full=full,
        stored=len(stored),
    )
    assert refused[0].reason.startswith("the disk is nearly full"), refused[0]
    assert again == []
    assert sorted(stored) == sorted(accepted)


async def test_sigterm_while_draining_exits_0_and_keeps_the_rest(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """F19 on the uplink side: what was not acknowledged by the sink is still buffered."""
    device = new_device(pki, "f19")
    async with sink(tmp_path, pki) as server:
        path = configure(tmp_path, pki, device, server.port, extra='format = "raw"\nwindow = 2')
        config = load_config(path)
        await preload(config, 3000)
        agent = agent_process(process_factory, path)
        await agent.astart()
        await until(lambda: bool(stored_payloads(tmp_path / "core.db")), timeout=30)
        assert await agent.asigterm() == 0
    stored = set(stored_payloads(tmp_path / "core.db"))
    left = {int(e.payload) for e in read_events(config.agent.data_dir)}
    figures("sigterm while draining", events=3000, delivered=len(stored), still_buffered=len(left))
    assert stored | left == set(range(3000))
    assert left, "the drain finished before SIGTERM: the test proves nothing"


@pytest.mark.parametrize("shape", ["latency 500ms", "2 kB/s", "1-byte slices"])
async def test_slow_links_cause_no_false_disconnects(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, shape: str
) -> None:
    """F6: while bytes flow, keep-alive (3 s here) never declares a slow link dead."""
    device = new_device(pki, "f6")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        if shape == "latency 500ms":
            proxy.latency(0.5)
        elif shape == "2 kB/s":
            proxy.bandwidth(2000)
        else:
            proxy.slice(1)
        config = load_config(
            configure(tmp_path, pki, device, proxy.port, extra="keepalive = 3\nwindow = 4")
        )
        events = 60
        async with Agent(config) as agent:
            for i in range(events):
                await agent.publish("sensors/t", f"{i}".encode() * 20)
                await asyncio.sleep(0.1)
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=90)
            assert agent.uplink is not None
            connections = agent.uplink.status.connections
    stored = [m.payload for _, m in read_messages(tmp_path / "core.db")]
    figures(f"slow link ({shape})", events=events, stored=len(stored), connections=connections)
    assert len(stored) == events
    assert connections == 1, "the slow link was dropped and reconnected"


async def test_large_messages_cross_a_slow_link_without_false_disconnects(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """F6 with messages that take longer than the keep-alive to cross: 64 KiB batches at
    10 kB/s take 6.5 s, and the link holds little, so they wait in the agent's send queue. The
    sink's PINGRESP waits behind them, so for seconds nothing comes back: the agent's watchdog
    (1.5 x keep-alive) and paho's own check (about 2 x) used to call such a link dead, every
    time, and the events never crossed. TCP acknowledging the agent's bytes is life too, and
    holds off the publish timeout as well. Last comes one event of 100 kB (10 s, 5 keep-alives
    without a byte back): no limit in time cuts it."""
    device = new_device(pki, "f6big")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        proxy.bandwidth(10_000, direction=Direction.UPSTREAM)
        # A publish_timeout shorter than a crossing too: moving bytes are not a late PUBACK.
        extra = "keepalive = 2\npublish_timeout = 3"
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        events = 130
        await preload(config, events, size=1000)
        async with Agent(config) as agent:
            await agent.publish("sensors/big", b"130".ljust(100_000))
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=120)
            assert agent.uplink is not None
            connections = agent.uplink.status.connections
    stored = stored_payloads(tmp_path / "core.db")
    figures("large messages, slow link", events=events + 1, connections=connections)
    assert sorted(stored) == list(range(events + 1))
    assert connections == 1, "the slow link was dropped and reconnected"


@pytest.mark.parametrize("mix", ["QoS 0", "QoS 0 and 1"])
async def test_a_qos0_stream_crosses_a_slow_link_without_false_disconnects(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, mix: str
) -> None:
    """F6 for QoS 0 alone: nothing is owed for it, so nothing comes back while it crosses, and
    the keep-alive's PINGREQ waits behind the queued bytes. At 20 kB/s 500 kB take 25 s, 12
    keep-alives: the link used to be called dead every few seconds, and what was in the socket
    at each cut was lost. The agent now asks the sink for a PINGRESP and counts the progress of
    its bytes until the sink has the PINGREQ. Then the link stays idle for 4 keep-alives: the
    sink's keep-alive must still get paho's PINGREQs in time.

    With one QoS 1 event in ten, the small QoS 1 message in flight waits behind the QoS 0 bytes
    queued before it, far more than two of its size: until its PUBACK can come, the progress of
    those bytes is life all the same."""
    device = new_device(pki, "f6q0")
    topics = ("bulk/x",) if mix == "QoS 0" else ("bulk/x",) * 9 + ("sensors/t",)
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        proxy.bandwidth(20_000, direction=Direction.UPSTREAM)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra="keepalive = 2"))
        events = 500
        await preload(config, events, topics=topics, size=1000)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: len(stored_payloads(tmp_path / "core.db")) >= events, timeout=90)
            await asyncio.sleep(4 * 2)
            connections, failures = uplink.status.connections, uplink.status.failures
    stored = stored_payloads(tmp_path / "core.db")
    figures(f"{mix}, slow link", events=events, stored=len(stored), connections=connections)
    assert sorted(stored) == list(range(events))
    assert (connections, failures) == (1, 0), "the slow link was dropped and reconnected"


async def test_a_cut_of_a_slow_link_loses_little_of_a_qos0_stream(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A QoS 0 event counts as sent once written to the socket, and is then deleted. Without a
    bound the kernel takes megabytes, minutes of a slow link, all lost at a cut: 2,882 of these
    3,000 events were. `UNSENT_LIMIT` keeps the rest in the buffer: a reset loses about
    what the kernel holds unsent (128 KiB), one batch in paho and what the path held."""
    device = new_device(pki, "cut0")
    events = 3000
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        proxy.bandwidth(20_000, direction=Direction.UPSTREAM)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra="keepalive = 5"))
        await preload(config, events, topics=("bulk/x",), size=1000)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: len(stored_payloads(tmp_path / "core.db")) >= 60, timeout=30)
            left_at_cut = inspect(config.agent.data_dir).events
            await proxy.reset()
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            connections = uplink.status.connections
    stored = stored_payloads(tmp_path / "core.db")
    lost = events - len(set(stored))
    figures("cut of a QoS 0 stream", events=events, left_at_cut=left_at_cut, lost=lost)
    assert connections >= 2
    assert lost <= (UNSENT_LIMIT + 64 * 1024 + 32 * 1024) // 1000, "more lost than the bound"


async def test_a_frozen_sink_is_noticed_while_large_messages_are_sent(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """A sink that stops (SIGSTOP: a hung process, its kernel still up) while large messages
    flow. Its kernel acknowledges what fits in its receive buffer, then nothing: that
    progress of the agent's bytes (F6) must not keep the link alive. The agent gives up on the
    connection within a few keep-alives and delivers everything once the sink runs again."""
    port, sink_process = sink_on_a_port(tmp_path, pki, process_factory)
    await sink_process.astart()
    device = new_device(pki, "frozen")
    config = load_config(configure(tmp_path, pki, device, port, extra="keepalive = 2"))
    sent = 0

    async def publish(count: int) -> None:
        nonlocal sent
        for _ in range(count // 100):
            numbers = range(sent, sent + 100)
            await asyncio.gather(
                *(agent.publish("sensors/t", f"{n}".encode().ljust(1000)) for n in numbers)
            )
            sent += 100
            await asyncio.sleep(0.05)

    async with Agent(config) as agent:
        assert agent.uplink is not None
        uplink = agent.uplink
        await publish(300)
        sink_process.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # 3 MB over 1.5 s: more than the window, more than a receive buffer takes.
        await publish(3000)
        await until(lambda: uplink.status.state is not LinkState.ONLINE, timeout=30)
        noticed = time.monotonic() - stopped
        sink_process.signal(signal.SIGCONT)
        await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=90)
        connections = uplink.status.connections
    assert await sink_process.asigterm() == 0
    stored = stored_payloads(tmp_path / "core.db")
    figures("frozen sink", events=sent, noticed_after_s=round(noticed, 1), connections=connections)
    assert sorted(set(stored)) == list(range(sent))
    assert noticed < 15, "a frozen sink kept the link looking alive"


@pytest.mark.parametrize("topic", ["sensors/t", "bulk/x"])
async def test_progress_of_our_bytes_stops_counting_when_nothing_comes_back(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory, topic: str
) -> None:
    """Bytes still acknowledged by TCP while nothing at all comes back (here the path from the
    sink is cut while the way up runs at 40 kB/s; a middlebox in front of a hung sink does the
    same): without a limit the agent would count that as life for as long as it has a window to
    send, 1 MiB, 26 s. It stops counting once the sink's TCP has the PINGREQ the agent queued
    when progress first counted (about 200 KiB behind what was queued then, with the slack: 5 s)
    and then gives up after 1.5 keep-alives. The same under a stream of QoS 0 alone
    (``bulk/x``), for which the sink owes nothing but that PINGRESP; what was in the socket at
    the cut is lost then, everything else is delivered afterwards."""
    device = new_device(pki, "mute")
    events = 1500
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port, hold=4096)
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra="keepalive = 2"))
        await preload(config, events, topics=(topic,), size=1000)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None, timeout=30)
            proxy.bandwidth(40_000, direction=Direction.UPSTREAM)
            proxy.blackhole(direction=Direction.DOWNSTREAM)
            cut = time.monotonic()
            await until(lambda: uplink.status.state is not LinkState.ONLINE, timeout=60)
            noticed = time.monotonic() - cut
            error = uplink.status.last_error
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=90)
    stored = stored_payloads(tmp_path / "core.db")
    noticed = round(noticed, 1)
    figures(f"mute peer ({topic})", noticed_after_s=noticed, stored=len(stored), error=error)
    if topic == "sensors/t":
        assert sorted(stored) == list(range(events))
    else:
        assert len(stored) == len(set(stored))
        assert set(stored) <= set(range(events))
        assert max(stored) == events - 1, "the events after the cut were not delivered"
    assert noticed < 20, error


async def test_an_unacknowledged_publish_times_out_and_is_sent_again(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """Acknowledgements that never come end the connection after ``publish_timeout`` (well
    before keep-alive would notice), and the events go again on the next one."""
    extra = 'publish_timeout = "1s"\nkeepalive = 600'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "ptimeout", extra) as held:
        agent, uplink, proxy = held
        started = asyncio.get_running_loop().time()
        for i in range(20):
            await agent.publish("sensors/t", f"{i}".encode())
        await until(lambda: "not confirmed within 1s" in uplink.status.last_error, timeout=10)
        waited = asyncio.get_running_loop().time() - started
        figures("publish timeout 1s", seconds_to_failure=round(waited, 2))
        assert uplink.status.delivered == 0
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
    stored = sorted({int(m.payload) for _, m in read_messages(tmp_path / "core.db")})
    assert stored == list(range(20))


async def test_no_packet_id_is_reused_while_in_flight(
    tmp_path: Path,
    pki: Pki,
    chaos_proxy_factory: ChaosProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paho's packet ids wrap after 65,535; the uplink sends nothing whose id could be the oldest
    in flight's. Shown with the span cut to 3: with acknowledgements held, 3 messages go out."""
    monkeypatch.setattr(window_module, "MID_SPAN", 3)
    extra = 'format = "raw"\nwindow = 10'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "mids", extra) as held:
        agent, uplink, proxy = held
        for i in range(50):
            await agent.publish("sensors/t", f"{i}".encode())
        await until(lambda: uplink.in_flight == 3)
        peak = uplink.in_flight
        for _ in range(20):
            await asyncio.sleep(0.05)
            peak = max(peak, uplink.in_flight)
        assert peak == 3
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
    stored = sorted({int(m.payload) for _, m in read_messages(tmp_path / "core.db")})
    assert stored == list(range(50))


async def test_an_event_alone_in_flight_at_a_cut_goes_again_without_other_traffic(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """An event alone in flight when the connection is lost is a suspect (poison handling), but
    with nothing else to send it is tried again at once, not held until other events flow."""
    device = new_device(pki, "alone")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        config = load_config(configure(tmp_path, pki, device, proxy.port))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            proxy.blackhole(direction=Direction.UPSTREAM)  # the PUBLISH never reaches the sink
            await agent.publish("sensors/t", b"0")
            await until(lambda: uplink.in_flight == 1)
            await proxy.reset()
            await until(lambda: uplink.status.failures >= 1)
            proxy.pass_through()
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
            assert uplink.status.dead_lettered == 0
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"0"]


async def test_an_event_alone_in_flight_when_the_link_dies_is_not_blamed(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A blackhole (F5) with one event alone in flight: paho's keep-alive or the silence watchdog
    ends the connection. That was counted against the event as if the sink had closed on it, so
    a quiet, flapping link dead-lettered innocent events after ``max_attempts`` blackholes. It
    is set aside (a path that drops a large packet would otherwise hold the others back) and
    never counted; after its first such loss it goes again as soon as the link is back."""
    device = new_device(pki, "dead-link")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'keepalive = 2\npublish_timeout = "5s"'  # dead after 4 s, before the timeout
        path = configure(tmp_path, pki, device, proxy.port, extra=extra)
        config = load_config(path)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            proxy.blackhole()
            event_id = await agent.publish("sensors/t", b"0")
            await until(lambda: uplink.in_flight == 1)
            await until(lambda: uplink.status.failures >= 1, timeout=20)
            assert uplink.status.last_error is not None
            error = uplink.status.last_error
            assert "Keep alive timeout" in error or "the link is dead" in error, error
            seq = int(event_id.rsplit("/", 1)[1])
            assert counted_losses(config.agent.data_dir, seq) == 0
            proxy.pass_through()
            await agent.publish("sensors/t", b"1")
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            assert uplink.status.dead_lettered == 0
    assert sorted(m.payload for _, m in read_messages(tmp_path / "core.db")) == [b"0", b"1"]


async def test_an_event_set_aside_then_expired_is_not_sent(tmp_path: Path, pki: Pki) -> None:
    """An event set aside (lost alone in flight) was sent from its copy in memory after the TTL
    sweep had dropped (and counted) it: the core queue got an event reported as dropped."""
    device = new_device(pki, "ttl-suspect")
    async with sink(tmp_path, pki) as server:
        path = write_config(
            tmp_path / "agent", device_id=device.device_id,
            buffer='ttl_sweep_interval = "200ms"',
            uplink=uplink_section(pki, device, server.port),
            topics='[[topics]]\nfilter = "#"\nqos = 1\nttl = "2s"\n',
        )  # fmt: skip
        config = load_config(path)
        data = config.agent.data_dir
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.connected_since is not None)
            # The sink's stage fails: it closes the connection, nothing acknowledged or stored.
            failpoints.arm("ingest.before_store", "raise")
            try:
                await agent.publish("sensors/t", b"expired")
                await until(lambda: uplink.status.failures >= 1)  # lost alone: set aside
                await until(lambda: ("ttl", "sensors/t") in inspect(data).drops, timeout=10)
            finally:
                failpoints.disarm_all()
            await agent.publish("sensors/t", b"fresh")
            await until(lambda: inspect(data).events == 0, timeout=20)
            await asyncio.sleep(0.5)  # a probe of the stale copy would go now
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"fresh"]


@pytest.mark.parametrize("how", ["sink stops", "silent close, late"])
async def test_a_sink_stopping_during_our_connect_is_not_a_certificate_refusal(
    tmp_path: Path, pki: Pki, how: str
) -> None:
    """A sink stopped (or restarted) while it handled our CONNECT closed the connection without
    a byte: that was read as a refusal of our certificate, and the agent waited out the slow
    back-off of refusals (30 s to 15 min) with `status` saying "refused". Our sink now answers
    CONNACK 3 "server unavailable" when it stops then; and a silent close later than
    `REFUSAL_WINDOW` after the handshake (another server; here an authenticator that fails, an
    internal error) is a transient failure too."""
    device = new_device(pki, "restart")
    port = free_port()
    config = load_config(configure(tmp_path, pki, device, port))
    async with Agent(config) as agent:
        assert agent.uplink is not None
        uplink = agent.uplink
        # What the uplink made of each failure: its state alone is a race (a short back-off,
        # full jitter, is over and the next attempt CONNECTING by the time a test looks).
        judged: list[LinkFailure] = []
        back_off = uplink._back_off

        async def judging(failure: LinkFailure) -> None:
            judged.append(failure)
            await back_off(failure)

        uplink._back_off = judging  # type: ignore[method-assign]
        await agent.publish("sensors/t", b"0")
        async with sink(tmp_path, pki, port=port) as server:
            entered = asyncio.Event()

            async def stalled(request: ConnectRequest) -> Identity | Refusal:
                entered.set()
                if how == "sink stops":
                    await asyncio.sleep(3600)  # the sink stops while it is here
                await asyncio.sleep(REFUSAL_WINDOW + 0.5)
                raise RuntimeError("closes the connection without a CONNACK")

            server.authenticator.authenticate = stalled  # type: ignore[method-assign]
            await entered.wait()
            failures = uplink.status.failures  # refused connections before the sink was up
            seen = len(judged)
            if how == "silent close, late":
                await until(lambda: uplink.status.failures > failures, timeout=20)
        await until(lambda: uplink.status.failures > failures, timeout=20)
        after = judged[seen:]
        assert after, judged
        assert not any(failure.refused for failure in after), [f.detail for f in after]
        assert uplink.status.state is not LinkState.REFUSED, uplink.status.last_error
        if how == "sink stops":  # our sink says why
            assert "Server unavailable" in after[0].detail, after[0].detail
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"0"]


async def test_only_a_connection_that_was_up_resets_the_back_off(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """``stable_after`` was timed from the start of the attempt: connects that each failed after
    their whole ``connect_timeout`` (as long as ``stable_after`` here) reset the back-off every
    time, and the agent hammered a sink that never answered at the initial delay."""
    device = new_device(pki, "stable")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        proxy.blackhole()  # accepted, never answered
        extra = 'connect_timeout = "1s"\nstable_after = "1s"'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        async with Agent(config) as agent:
            assert agent.uplink is not None
            uplink = agent.uplink
            await until(lambda: uplink.status.failures >= 3, timeout=30)
            assert uplink._backoff.failures >= 3  # growing, not started over at each attempt
            proxy.pass_through()
            await until(lambda: uplink.status.connected_since is not None, timeout=30)


async def test_window_bytes_bounds_what_is_in_flight(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """With the acknowledgements held, no more than ``window_bytes`` of payloads go out, however
    large the window; once they flow again, everything arrives."""
    extra = 'format = "raw"\nwindow = 100\nwindow_bytes = 4000'
    async with acks_held(tmp_path, pki, chaos_proxy_factory, "wbytes", extra) as held:
        agent, uplink, proxy = held
        for i in range(200):
            await agent.publish("sensors/t", b"%04d" % i + bytes(996))  # 1,000-byte events
        await until(lambda: uplink.in_flight == 4)
        peak = uplink.in_flight
        for _ in range(20):
            await asyncio.sleep(0.05)
            peak = max(peak, uplink.in_flight)
        figures("window_bytes 4000", in_flight=peak)
        assert peak == 4  # 4 x 1,000 bytes: the window of 100 never fills
        proxy.pass_through()
        await until(lambda: inspect(agent.config.agent.data_dir).events == 0, timeout=30)
    stored = [int(m.payload[:4]) for _, m in read_messages(tmp_path / "core.db")]
    assert sorted(set(stored)) == list(range(200))


async def test_two_gateways_with_one_identity_both_deliver_everything(
    tmp_path: Path, pki: Pki
) -> None:
    """RELIABILITY F20, through the sink: a gateway cloned with its credentials (or replaced
    while the old one still runs) connects with the same client id. Each CONNECT takes the
    session over from the other; both keep reconnecting, and every event of both gets through,
    once each (their buffers have different epochs, so their ids never collide)."""
    device = new_device(pki, "f20")
    async with sink(tmp_path, pki) as server:
        configs = [
            load_config(configure(tmp_path / name, pki, device, server.port, extra="window = 8"))
            for name in ("one", "two")
        ]
        sent = 200
        async with Agent(configs[0]) as first, Agent(configs[1]) as second:
            for n in range(sent):
                await first.publish("sensors/t", f"{n}".encode())
                await second.publish("sensors/t", f"{sent + n}".encode())
            await until(
                lambda: all(inspect(c.agent.data_dir).events == 0 for c in configs), timeout=90
            )
            assert first.uplink is not None
            assert second.uplink is not None
            connections = first.uplink.status.connections + second.uplink.status.connections
        takeovers = counters(server).get("takeovers")
    stored = stored_payloads(tmp_path / "core.db")
    figures(
        "one identity, two gateways", events=2 * sent, stored=len(stored),
        connections=connections, takeovers=takeovers,
    )  # fmt: skip
    assert sorted(stored) == list(range(2 * sent))  # all, once each
    assert takeovers >= 1


def with_priority(path: Path, priority: int) -> AgentConfig:
    """The agent's config at ``path`` with the catch-all rule at ``priority`` (written back)."""
    rule = 'filter = "#"\nqos = 1'
    path.write_text(path.read_text().replace(rule, f"{rule}\npriority = {priority}"))
    config = load_config(path)
    assert config.topics[-1].priority == priority
    return config


async def test_a_topic_whose_priority_changed_keeps_its_order(tmp_path: Path, pki: Pki) -> None:
    """Events buffered at priority 0, then the topic's rule moved to priority 5 and more came.
    Rows kept the priority they were stored with, and the drain (priority first) sent the newer
    events first (SPEC P3). In batch-v1 one envelope held both runs, its seqs not increasing: it
    failed to encode on every connection and nothing more was delivered. At start the buffered
    events now take their topic's priority of now."""
    device = new_device(pki, "prio")
    async with sink(tmp_path, pki) as server:
        path = configure(tmp_path, pki, device, server.port)  # the default batch format
        await preload(load_config(path), 3)
        config = with_priority(path, 5)
        async with Agent(config.model_copy(update={"uplink": None})) as agent:
            for payload in (b"10", b"11", b"12"):
                await agent.publish("sensors/t", payload)
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=20)
            failures = uplink.status.failures
    assert failures == 0
    assert stored_payloads(tmp_path / "core.db") == [0, 1, 2, 10, 11, 12]


async def test_a_reload_gives_buffered_events_their_new_priority(tmp_path: Path, pki: Pki) -> None:
    """SIGHUP with a topic's priority raised (say, alarms stuck behind a backlog of telemetry
    during an outage): the buffered events of that topic take it too, not only new ones."""
    device = new_device(pki, "reprio")
    path = configure(tmp_path, pki, device, free_port())  # nothing listens: all stays buffered
    config = load_config(path)
    async with Agent(config) as agent:
        for payload in (b"1", b"2", b"3"):
            await agent.publish("sensors/t", payload)
        await agent.publish("alarms/door", b"a")  # its own rule: priority 9, not changed
        assert agent.reload(with_priority(path, 5)) == []
        data = config.agent.data_dir
        await until(
            lambda: [e.priority for e in read_events(data) if e.topic == "sensors/t"] == [5] * 3,
            timeout=10,
        )
        priorities = {e.topic: e.priority for e in read_events(data)}
    assert priorities == {"sensors/t": 5, "alarms/door": 9}


async def test_an_alarm_committed_during_an_empty_read_above_the_cursor_is_sent(
    tmp_path: Path, pki: Pki, chaos_proxy_factory: ChaosProxyFactory
) -> None:
    """A read of events above the cursor's priority (preemption) finds nothing, and an alarm is
    committed while it runs: the next read, after the cursor, cleared the preemption flag
    although it cannot see priorities above the cursor, and the alarm stayed in the buffer
    until the next connection (with a token file: until its renewal, or never). The commit is
    placed inside that read by wrapping the buffer's read (the seam the uplink reads through)."""
    device = new_device(pki, "preempt")
    async with sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        extra = 'format = "raw"\nwindow = 4\nwindow_bytes = 4000'
        config = load_config(configure(tmp_path, pki, device, proxy.port, extra=extra))
        data = config.agent.data_dir
        await preload(config, 60, size=1000)  # priority 0 ("alarms/#" has priority 9)
        proxy.bandwidth(40_000, direction=Direction.UPSTREAM)
        async with Agent(config) as agent:
            uplink = agent.uplink
            assert uplink is not None
            buffer = uplink.buffer
            read = buffer.next_events
            committed = asyncio.Event()

            async def next_events(
                limit: int,
                after: tuple[int, int] | None = None,
                *,
                skip: frozenset[int] = frozenset(),
                max_bytes: int | None = None,
                above: int | None = None,
                hold: bool = False,
            ) -> list[StoredEvent]:
                events = await read(
                    limit, after, skip=skip, max_bytes=max_bytes, above=above, hold=hold
                )
                if above is not None and not events and not committed.is_set():
                    committed.set()
                    await agent.publish("alarms/a", b"2000")  # after this read's snapshot
                return events

            buffer.next_events = next_events  # type: ignore[method-assign]
            await until(lambda: uplink.status.delivered >= 10, timeout=20)
            await agent.publish("alarms/a", b"1000")  # preempts; the read after it is empty
            await asyncio.wait_for(committed.wait(), 20)
            proxy.pass_through()
            await until(lambda: inspect(data).events == 0, timeout=20)
            connections = uplink.status.connections
    assert connections == 1
    assert sorted(stored_payloads(tmp_path / "core.db"))[-2:] == [1000, 2000]


def test_an_envelope_run_ends_where_the_seq_does_not_increase(tmp_path: Path, pki: Pki) -> None:
    """Rows of one topic at two priorities (a reload in progress, a requeued dead letter) come
    in drain order with seqs going down: each run of increasing seqs is its own envelope."""
    config = load_config(configure(tmp_path, pki, new_device(pki, "runs"), free_port()))
    assert config.uplink is not None
    messages = Messages(config.uplink, "dev", "0123456789abcdef")

    def event(seq: int, priority: int) -> StoredEvent:
        return StoredEvent(seq, "sensors/t", b"x", 1, priority, 0, 0)

    out = messages.drain_order([event(4, 5), event(5, 5), event(1, 0), event(2, 0)])
    assert [m.seqs for m in out] == [[4, 5], [1, 2]]


def test_a_topic_whose_qos_changed_twice_goes_up_in_seq_order(tmp_path: Path, pki: Pki) -> None:
    """Found by review: events keep the QoS their rule had when they were accepted, and
    envelopes were grouped by topic and QoS: a topic at QoS 1, then 2, then 1 again went up as
    seqs 1-2 and 5-6 (one envelope), then 3-4 (SPEC P3, with no fault)."""
    config = load_config(configure(tmp_path, pki, new_device(pki, "qos-runs"), free_port()))
    assert config.uplink is not None
    messages = Messages(config.uplink, "dev", "0123456789abcdef")

    def event(seq: int, qos: int) -> StoredEvent:
        return StoredEvent(seq, "sensors/t", b"x", qos, 0, 0, 0)

    out = messages.drain_order([event(1, 1), event(2, 1), event(3, 2), event(4, 2), event(5, 1)])
    assert [(m.seqs, m.qos) for m in out] == [([1, 2], 1), ([3, 4], 2), ([5], 1)]
