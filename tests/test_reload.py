"""SIGHUP reload (issue #7): what each service reloads, that the new material is used on the next
connection, and that a broken file is refused with a log line while the old one stays in use."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import signal
import socket
import ssl
import time
import uuid
from pathlib import Path

import aiomqtt
import pytest

from cloud_sink.backends import read_messages
from cloud_sink.config import parse_config
from cloud_sink.service import Sink
from edge_agent import Agent, load_config
from edge_agent.buffer import inspect
from edge_agent.token import TokenFile, TokenUnavailable
from mqtt_ingest.clock import FakeClock
from tests.harness.agent import AGENT_READY, start_agent, uplink_section, write_config
from tests.harness.chaos import ChaosProxyFactory
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ManagedProcess, ProcessFactory, console_script
from tests.harness.report import until
from tests.harness.sink import CLOUD_SINK, device_token, running_sink, write_sink_config
from tests.harness.stages import SlowStage, running_server
from tests.harness.uplink import issue_token, issuer_key

pytestmark = pytest.mark.integration

RULES = """
[[topics]]
filter = "big/#"
max_payload = "{limit}"

[[topics]]
filter = "#"
"""


async def publish_acked(port: int, topic: str, payload: bytes) -> bool:
    """Whether the agent's listener acknowledged the event (QoS 1)."""
    try:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=f"p-{uuid.uuid4().hex[:6]}", timeout=5
        ) as client:
            await client.publish(topic, payload, qos=1, timeout=5)
    except aiomqtt.MqttError:
        return False
    return True


async def test_agent_sighup_reloads_topic_rules_and_refuses_a_broken_file(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    path = write_config(tmp_path, topics=RULES.format(limit="4KiB"))
    agent = start_agent(process_factory, path)
    assert await publish_acked(agent.port, "big/x", b"x" * 2000)
    path.write_text(path.read_text().replace('"4KiB"', '"1KiB"'))
    agent.signal(signal.SIGHUP)
    await until(lambda: "reloaded" in agent.output())
    assert "after a restart" not in agent.output()  # --listen-port overrides the file's port
    assert not await publish_acked(agent.port, "big/x", b"x" * 2000)  # over the new limit
    assert await publish_acked(agent.port, "big/x", b"x" * 500)
    path.write_text(path.read_text().replace("[[topics]]", "[[topics", 1))  # broken TOML
    agent.signal(signal.SIGHUP)
    await until(lambda: "reload refused" in agent.output())
    assert not await publish_acked(agent.port, "big/x", b"x" * 2000)  # the 1KiB rule stays
    assert await agent.asigterm() == 0
    assert inspect(tmp_path / "data").events == 2


async def test_agent_sighup_says_a_new_listener_port_needs_a_restart(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    """Without `run --listen-port`, the port came from the file, and the reload replaced the
    file's new port with the running one before comparing: no word that it needs a restart."""
    path = write_config(tmp_path)  # port = 0: any free port
    agent = process_factory(
        [console_script("edge-agent"), "--config", str(path), "run"],
        ready=AGENT_READY,
        name="edge-agent",
    )
    path.write_text(path.read_text().replace("port = 0", f"port = {free_port()}"))
    agent.signal(signal.SIGHUP)
    await until(lambda: "reloaded" in agent.output())
    await until(lambda: "changed but only applied after a restart: listener" in agent.output())
    assert await publish_acked(agent.port, "t", b"still on the port it started with")
    assert await agent.asigterm() == 0


async def test_agent_ignores_sighup_while_it_stops(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory,
    chaos_proxy_factory: ChaosProxyFactory,
) -> None:  # fmt: skip
    """A SIGHUP during the stop reloaded the configuration into an agent settling its uplink's
    in-flight messages: a new connection requested while it was ending."""
    device = pki.device(f"hupstop-{uuid.uuid4().hex[:6]}")
    async with running_sink(tmp_path, pki) as server:
        proxy = await chaos_proxy_factory("127.0.0.1", server.port)
        path = write_config(
            tmp_path, device_id=device.device_id, uplink=uplink_section(pki, device, proxy.port)
        )
        agent = start_agent(process_factory, path)
        await until(lambda: "uplink: online" in agent.output())
        proxy.blackhole()  # what goes out now stays in flight: the stop waits for it (3 s)
        assert await publish_acked(agent.port, "sensors/t", b"in flight at the stop")
        agent.signal(signal.SIGTERM)
        await until(lambda: "stopping on signal" in agent.output())
        agent.signal(signal.SIGHUP)
        assert await agent.await_exit() == 0
    output = agent.output()
    assert "SIGHUP while stopping: ignored" in output
    assert "reloaded" not in output
    assert inspect(tmp_path / "data").events == 1  # never acknowledged: kept for the next run


async def test_agent_reload_that_removes_the_uplink_keeps_running_the_one_it_has(
    tmp_path: Path, pki: Pki
) -> None:
    """A reload removing [uplink] (refused: needs a restart) still took the uplink out of the
    agent's configuration, while the uplink ran on: restoring the section with changes was then
    called "added" again, and its new settings were never applied."""
    device = pki.device(f"rm-{uuid.uuid4().hex[:6]}")
    path = write_config(tmp_path, uplink=uplink_section(pki, device, free_port()))
    with_uplink = path.read_text()
    async with Agent(load_config(path)) as agent:
        assert agent.uplink is not None
        without = load_config(path).model_copy(update={"uplink": None})
        assert agent.reload(without) == ["uplink (added or removed)"]
        assert agent.config.uplink == load_config(path).uplink  # the one that runs
        path.write_text(with_uplink.replace("[uplink]\n", "[uplink]\nkeepalive = 20\n", 1))
        assert agent.reload(load_config(path)) == []
        assert agent.config.uplink is not None
        assert (agent.config.uplink.keepalive, agent.uplink.config.keepalive) == (20, 20)


async def test_agent_reload_refuses_topic_rules_that_do_not_fit_the_running_listener(
    tmp_path: Path, pki: Pki
) -> None:
    """The new file's rules were checked against its own [listener], which only a restart
    applies: a max_payload over what the running listener takes was applied anyway."""
    device = pki.device(f"fit-{uuid.uuid4().hex[:6]}")
    small = 'port = 0\nmax_packet_size = "64KiB"'
    topics = '[[topics]]\nfilter = "#"\nmax_payload = {}\n'
    path = write_config(
        tmp_path,
        listener=small,
        uplink=uplink_section(pki, device, free_port()),
        topics=topics.format(64512),
    )
    text = path.read_text()
    async with Agent(load_config(path)) as agent:
        assert agent.uplink is not None
        connections = agent.uplink.status.connections
        path.write_text(
            text.replace('max_packet_size = "64KiB"', 'max_packet_size = "2MiB"').replace(
                "max_payload = 64512", 'max_payload = "1MiB"'
            )
        )
        with pytest.raises(ValueError, match=r"topics\[0\] \('#'\): 1048576"):
            agent.reload(load_config(path))
        assert agent.config.topics[0].max_payload == 64512  # nothing applied
        assert not agent.uplink.reconnecting.is_set()  # nor the uplink's reload
        assert agent.uplink.status.connections == connections


def install(creds: DeviceCreds, directory: Path) -> tuple[Path, Path]:
    """The device's certificate and key copied where the agent's config points."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "device.pem", directory / "device.key"
    shutil.copyfile(creds.cert, cert)
    shutil.copyfile(creds.key, key)
    return cert, key


async def test_agent_reload_rotates_the_certificate_and_keeps_the_old_one_if_broken(
    tmp_path: Path, pki: Pki
) -> None:
    device_id = f"rot-{uuid.uuid4().hex[:6]}"
    first = pki.device(device_id)
    cert, key = install(first, tmp_path / "creds")
    installed = DeviceCreds(device_id, cert, key, first.serial)
    crl = tmp_path / "crl.pem"
    shutil.copyfile(pki.crl, crl)
    async with running_sink(tmp_path, pki, listener_extra=f'crl = "{crl}"') as server:
        path = write_config(
            tmp_path / "agent",
            device_id=device_id,
            uplink=uplink_section(pki, installed, server.port),
        )
        async with Agent(load_config(path)) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await agent.publish("t", b"1")
            await until(lambda: status.delivered == 1)
            # Rotation: a new certificate and key for the same device, the old one revoked.
            renewed = tmp_path / "renewed"
            renewed.mkdir()
            second = pki.ca.issue_device(
                device_id, cert_path=renewed / "device.pem", key_path=renewed / "device.key"
            )
            shutil.copyfile(second.cert_path, cert)
            shutil.copyfile(second.key_path, key)
            pki.ca.revoke(hex(first.serial))  # rewrites the CA's CRL
            shutil.copyfile(pki.crl, crl)
            await until(lambda: server_refuses(first, pki, server.port), timeout=20)
            assert agent.reload(load_config(path)) == []
            await until(lambda: status.connections == 2)
            await agent.publish("t", b"2")
            await until(lambda: status.delivered == 2)
            # A broken certificate file is refused; the loaded one stays in use, reconnects too.
            cert.write_text("not a certificate")
            with pytest.raises(ValueError, match="unusable TLS files"):
                agent.reload(load_config(path))
            assert status.connections == 2
            await agent.publish("t", b"3")
            await until(lambda: status.delivered == 3)
            # An endpoint already bound is not moved: said, not silently ignored.
            cert.write_bytes(second.cert_path.read_bytes())
            path.write_text(path.read_text() + "\n[metrics]\nmax_topics = 7\n")
            assert agent.reload(load_config(path)) == ["metrics"]
            assert agent.reload(load_config(path)) == ["metrics"]  # still not applied
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"1", b"2", b"3"]


async def test_agent_reload_refuses_a_certificate_that_cannot_work_where_the_one_in_use_can(
    tmp_path: Path, pki: Pki
) -> None:
    """Found by review: a reload checked only that the files parse and the key matches. An
    expired certificate, one of another CA or of another device was taken, and the working link
    went down (refused) until someone noticed. Each is refused now, naming the file, and the
    link stays up on the material in use; a good rotation still passes. A broken key file is
    named too (ssl.SSLError is an OSError: it said only "cannot read the TLS files: [SSL] PEM
    lib")."""
    device_id = f"rr-{uuid.uuid4().hex[:6]}"
    cert, key = install(pki.device(device_id), tmp_path / "creds")
    good = cert.read_bytes(), key.read_bytes()
    out = tmp_path / "bad"
    out.mkdir()
    month_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    bad = {
        "expired at": pki.ca.issue_device(
            device_id, not_before=month_ago, days=1, cert_path=out / "e.pem", key_path=out / "e.key"
        ),
        "was not issued by a CA in": pki.other_ca.issue_device(
            device_id, cert_path=out / "f.pem", key_path=out / "f.key"
        ),
        f"not of device_id {device_id!r}": pki.ca.issue_device(
            f"{device_id}-other", cert_path=out / "o.pem", key_path=out / "o.key"
        ),
    }
    async with running_sink(tmp_path, pki) as server:
        path = write_config(
            tmp_path / "agent",
            device_id=device_id,
            uplink=uplink_section(pki, DeviceCreds(device_id, cert, key, 0), server.port),
        )
        async with Agent(load_config(path)) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await until(lambda: status.connections == 1)
            for reason, issued in bad.items():
                shutil.copyfile(issued.cert_path, cert)
                shutil.copyfile(issued.key_path, key)
                with pytest.raises(ValueError, match=reason) as refused:
                    agent.reload(load_config(path))
                assert str(cert) in str(refused.value)
            cert.write_bytes(good[0])
            key.write_text("not a key\n")
            with pytest.raises(ValueError, match="unusable TLS files") as refused:
                agent.reload(load_config(path))
            assert str(key) in str(refused.value)
            await agent.publish("t", b"after")
            await until(lambda: status.delivered == 1)
            assert (status.connections, status.failures) == (1, 0)
            renewed = pki.ca.issue_device(
                device_id, cert_path=out / "r.pem", key_path=out / "r.key"
            )
            shutil.copyfile(renewed.cert_path, cert)
            shutil.copyfile(renewed.key_path, key)
            assert agent.reload(load_config(path)) == []
            await until(lambda: status.connections == 2)


async def test_agent_reload_is_not_refused_for_a_problem_the_certificate_in_use_has(
    tmp_path: Path, pki: Pki
) -> None:
    """The reload checks guard a working link only: with the certificate of another device in
    use (the link refused), a reload of the same files with a new topic policy is taken."""
    device_id = f"rs-{uuid.uuid4().hex[:6]}"
    other = pki.device(f"{device_id}-other")
    async with running_sink(tmp_path, pki) as server:
        path = write_config(
            tmp_path / "agent",
            device_id=device_id,
            uplink=uplink_section(pki, other, server.port),
        )
        async with Agent(load_config(path)) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await until(lambda: status.failures >= 1)
            path.write_text(path.read_text().replace("priority = 9", "priority = 3"))
            assert agent.reload(load_config(path)) == []
            assert agent.config.topics[0].priority == 3


async def test_new_priorities_while_a_window_is_in_flight_send_nothing_twice(
    tmp_path: Path, pki: Pki
) -> None:
    """Noticed by the drain review: a reload that changes a topic's priority gives its buffered
    events the new one while the connection goes on when nothing ends it (here [uplink] removed
    at the same time: refused, the uplink keeps running unreloaded). Events in flight at their
    old priority were read again at the new one and sent twice (raw mode: nothing dedupes)."""
    stage = SlowStage(1.0)
    async with running_server(stage, ssl_context=pki.server_context()) as server:
        device = pki.device(f"prio-{uuid.uuid4().hex[:6]}")
        topics = '[[topics]]\nfilter = "a/#"\nqos = 1\n\n[[topics]]\nfilter = "#"\nqos = 1\n'
        path = write_config(
            tmp_path / "agent",
            device_id=device.device_id,
            uplink=uplink_section(pki, device, server.port, extra='format = "raw"\nwindow = 10'),
            topics=topics,
        )
        config = load_config(path)
        async with Agent(config) as agent:
            await agent.publish_many([("a/x", b"%d" % n) for n in range(5)])
            await until(lambda: stage.calls >= 1)  # in flight, the stage storing the first
            text = path.read_text()
            without_uplink = text[: text.index("[uplink]")] + text[text.index("[[topics]]") :]
            path.write_text(
                without_uplink.replace('"a/#"\nqos = 1', '"a/#"\nqos = 1\npriority = 9')
            )
            assert agent.reload(load_config(path)) == ["uplink (added or removed)"]
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
    assert sorted(stage.payloads()) == [b"%d" % n for n in range(5)]


async def test_agent_reload_reconnects_at_once_when_idle(tmp_path: Path, pki: Pki) -> None:
    """A reload's new connection starts at once even when the agent has nothing to send (its
    feeder waits for events; a new CRL found by the uplink's own watch takes the same way)."""
    device = pki.device(f"idle-{uuid.uuid4().hex[:6]}")
    async with running_sink(tmp_path, pki) as server:
        path = write_config(
            tmp_path / "agent", device_id=device.device_id,
            uplink=uplink_section(pki, device, server.port),
        )  # fmt: skip
        async with Agent(load_config(path)) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await until(lambda: status.connections == 1)
            path.write_text(path.read_text().replace("[uplink]\n", "[uplink]\nkeepalive = 20\n"))
            assert agent.reload(load_config(path)) == []
            await until(lambda: status.connections == 2, timeout=10)
        assert status.delivered == 0


def server_refuses(creds: DeviceCreds, pki: Pki, port: int) -> bool:
    """Whether the sink now refuses ``creds`` at the TLS handshake (CRL picked up)."""
    context = pki.client_context(creds)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.settimeout(2)
            return tls.recv(1) == b""
    except (ssl.SSLError, OSError):
        return True


def sink_process(processes: ProcessFactory, config: Path) -> ManagedProcess:
    return processes(
        [CLOUD_SINK, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
        start=False,
    )


async def connects(port: int, device: DeviceCreds, pki: Pki, password: str | None = None) -> bool:
    try:
        async with aiomqtt.Client(
            "localhost", port, identifier=device.device_id, username=device.device_id,
            password=password or device_token(device), tls_context=pki.client_context(device),
            timeout=5,
        ):  # fmt: skip
            return True
    except aiomqtt.MqttError:
        return False


async def test_sink_ignores_sighup_while_it_drains(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """A SIGHUP after SIGTERM reloaded the sink while it drained, and told systemd RELOADING and
    READY after STOPPING."""
    config = write_sink_config(tmp_path, pki)
    sink = process_factory(
        [CLOUD_SINK, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
        env={"BRIDGE_FAILPOINTS": "sink.sqlite.write=sleep:3@1"},  # the first write: 3 s
    )
    device = pki.device(f"drain-{uuid.uuid4().hex[:6]}")

    async def publish() -> None:
        async with aiomqtt.Client(
            "localhost", sink.port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=pki.client_context(device), timeout=10,
        ) as client:  # fmt: skip
            await client.publish(f"devices/{device.device_id}/t", b"in the drain", qos=1)

    publishing = asyncio.create_task(publish())
    await until(lambda: "connected from" in sink.output())
    await asyncio.sleep(0.3)  # the publish is in the (slow) write
    sink.signal(signal.SIGTERM)
    await until(lambda: "stopping on signal" in sink.output())
    sink.signal(signal.SIGHUP)
    assert await sink.await_exit() == 0
    await publishing  # acknowledged by the drain
    output = sink.output()
    assert "SIGHUP while stopping: ignored" in output
    assert "reloaded" not in output
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"in the drain"]


async def test_a_sink_reload_refused_for_its_crl_changes_nothing_else(
    tmp_path: Path, pki: Pki
) -> None:
    """[auth] was applied at once and the TLS files only later, where an older CRL put back is
    refused: the new deny list was in use although the reload was refused (and logged as
    done). Now the TLS files are judged first."""
    crl = pki.ca.write_crl(tmp_path / "crl.pem", days=1)
    older = shutil.copyfile(crl, tmp_path / "older.pem")
    pki.ca.write_crl(crl, days=1)  # replaced: a higher CRL number
    text = write_sink_config(tmp_path, pki).read_text()
    text = text.replace("[listener]\n", f'[listener]\ncrl = "{crl}"\n')
    device = pki.device(f"kept-{uuid.uuid4().hex[:6]}")
    async with Sink(parse_config(text)) as sink:
        assert await connects(sink.port, device, pki)
        shutil.copyfile(older, crl)  # a rollback: it would let revoked devices in again
        denying = text.replace("[auth]\n", f'[auth]\ndeny = ["{device.device_id}"]\n')
        with pytest.raises(ValueError, match="TLS files cannot be used"):
            sink.reload(parse_config(denying))
        assert await connects(sink.port, device, pki)  # the deny list was not applied
        assert sink.config.auth.deny == []


async def test_sink_sighup_reloads_the_deny_list_and_refuses_a_broken_file(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    config = write_sink_config(tmp_path, pki)
    sink = sink_process(process_factory, config)
    await sink.astart()
    device, other = (
        pki.device(f"deny-{uuid.uuid4().hex[:6]}"),
        pki.device(f"ok-{uuid.uuid4().hex[:6]}"),
    )
    assert await connects(sink.port, device, pki)
    config.write_text(
        config.read_text().replace("[auth]\n", f'[auth]\ndeny = ["{device.device_id}"]\n')
    )
    sink.signal(signal.SIGHUP)
    await until(lambda: "reloaded" in sink.output())
    assert not await connects(sink.port, device, pki)
    assert await connects(sink.port, other, pki)
    config.write_text(config.read_text().replace("[auth]", "[auth", 1))
    sink.signal(signal.SIGHUP)
    await until(lambda: "reload refused" in sink.output())
    assert not await connects(sink.port, device, pki)  # the deny list stays
    assert await sink.asigterm() == 0


async def test_sink_sighup_says_a_new_listener_port_needs_a_restart(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    """As the agent's: the override meant for `run --listen-port` applied always."""
    config = write_sink_config(tmp_path, pki)  # port = 0: any free port
    sink = process_factory(
        [CLOUD_SINK, "--config", str(config), "run"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
    )
    assert "port = 0" in config.read_text()
    config.write_text(config.read_text().replace("port = 0", f"port = {free_port()}", 1))
    sink.signal(signal.SIGHUP)
    await until(lambda: "changed but only applied after a restart: listener" in sink.output())
    device = pki.device(f"port-{uuid.uuid4().hex[:6]}")
    assert await connects(sink.port, device, pki)  # still on the port it started with
    assert await sink.asigterm() == 0


async def test_sink_reload_takes_new_issuer_keys(tmp_path: Path, pki: Pki) -> None:
    device = pki.device(f"kid-{uuid.uuid4().hex[:6]}")
    old_private, old_public = issuer_key(tmp_path / "old")
    new_private, new_public = issuer_key(tmp_path / "new")
    auth = 'mode = "issuer-signed"\nissuer = "https://issuer.test"\nissuer_keys = ["{key}"]\n'
    base = write_sink_config(tmp_path, pki).read_text()
    text = base.replace("[auth]\n", "[auth]\n" + auth.format(key=old_public))
    async with Sink(parse_config(text)) as sink:
        new_token = issue_token(device, new_private, ttl=300)
        assert await connects(sink.port, device, pki, issue_token(device, old_private, ttl=300))
        assert not await connects(sink.port, device, pki, new_token)  # k1 is still the old key
        rotated = base.replace("[auth]\n", "[auth]\n" + auth.format(key=new_public))
        assert sink.reload(parse_config(rotated)) == []
        # An endpoint already bound is not moved: said, not silently ignored.
        assert sink.reload(parse_config(rotated + "\n[metrics]\nport = 0\n")) == ["metrics"]
        assert await connects(sink.port, device, pki, new_token)
        broken = tmp_path / "broken" / "k1.pem"
        broken.parent.mkdir()
        broken.write_text("not a key")
        with pytest.raises(ValueError, match="issuer_keys"):
            sink.reload(
                parse_config(base.replace("[auth]\n", "[auth]\n" + auth.format(key=broken)))
            )
        assert await connects(sink.port, device, pki, new_token)


def test_a_missing_token_file_is_reported_once_until_it_changes(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Each connection attempt and renewal check asks for the token: the warning of a file gone
    was logged at every one."""
    device = pki.device(f"tokg-{uuid.uuid4().hex[:6]}")
    private, _ = issuer_key(tmp_path)
    path = tmp_path / "device.jwt"
    token = issue_token(device, private, ttl=300)
    path.write_text(token)
    tokens = TokenFile(path, FakeClock(start=time.time()))
    assert tokens.current().value == token
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="edge_agent.token"):
        for _ in range(5):
            assert tokens.current().value == token
        path.write_text(token)
        assert tokens.current().value == token  # back: a later problem is news again
        path.unlink()
        assert tokens.current().value == token
    warned = [r.getMessage() for r in caplog.records if "still using the token" in r.getMessage()]
    assert (
        warned
        == [
            f"uplink: cannot read the token file {path}: No such file or directory;"
            " still using the token read before"
        ]
        * 2
    )


def test_a_broken_token_file_keeps_the_token_read_before(tmp_path: Path, pki: Pki) -> None:
    """token-file mode: the file is read again when it changes; a broken new file is refused
    and the previous token stays in use while it is valid, an expired one is not sent."""
    device = pki.device(f"tokf-{uuid.uuid4().hex[:6]}")
    private, _ = issuer_key(tmp_path)
    path = tmp_path / "device.jwt"
    first = issue_token(device, private, ttl=300)
    path.write_text(first)
    clock = FakeClock(start=time.time())
    tokens = TokenFile(path, clock)
    assert tokens.current().value == first
    second = issue_token(device, private, ttl=600)
    path.write_text(second)
    assert tokens.current().value == second  # changed: read again
    path.write_text("not a token")
    assert tokens.current().value == second  # broken: the previous one stays
    clock.advance(601)
    with pytest.raises(TokenUnavailable, match="expired; put a fresh one there"):
        tokens.current()  # the previous one expired and the file is still broken
