"""Real MQTT clients against the ingest server: aiomqtt, paho and mosquitto_pub, plain and TLS.

Every event a client saw acknowledged is in the durable stage, in the order it was published.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import uuid

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_ingest import Anonymous, ConnectRequest, Identity, IngestServer, Limits
from tests.harness.pki import Pki
from tests.harness.rawmqtt import connect_packet, tls_connect
from tests.harness.stages import RecordingStage, counters, running_server

pytestmark = pytest.mark.integration

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
COUNT = 40


class CertificateIdentity:
    """Accept only a TLS-verified peer certificate; the identity is the client id."""

    def __init__(self) -> None:
        self.certificates: list[bytes] = []

    async def authenticate(self, request: ConnectRequest) -> Identity:
        assert request.peer_certificate is not None
        self.certificates.append(request.peer_certificate)
        return Identity(request.client_id)


def _tls(pki: Pki, tls: bool) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    if not tls:
        return None, None
    device = pki.device(f"client-{uuid.uuid4().hex[:8]}")
    return pki.server_context(), pki.client_context(device)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_aiomqtt_every_qos_in_order(stage: RecordingStage, pki: Pki, tls: bool) -> None:
    server_ctx, client_ctx = _tls(pki, tls)
    auth = CertificateIdentity()
    kwargs: dict[str, object] = {"ssl_context": server_ctx}
    if tls:
        kwargs["authenticator"] = auth
    async with (
        running_server(stage, **kwargs) as server,
        aiomqtt.Client(
            "localhost" if tls else "127.0.0.1",
            server.port,
            identifier="aiomqtt-client",
            tls_context=client_ctx,
        ) as client,
    ):
        for qos in (1, 2, 0):
            for i in range(COUNT):
                await client.publish(f"sensors/q{qos}", f"{qos}-{i}".encode(), qos=qos)
            if qos:
                # publish() at QoS 1/2 returned: the PUBACK/PUBREC came, so the stage has them.
                assert stage.payloads(f"sensors/q{qos}") == [
                    f"{qos}-{i}".encode() for i in range(COUNT)
                ]
        await stage.wait_for(3 * COUNT)
    assert stage.payloads("sensors/q0") == [f"0-{i}".encode() for i in range(COUNT)]
    assert {e.qos for e in stage.events} == {0, 1, 2}
    assert all(e.client_id == "aiomqtt-client" for e in stage.events)
    assert counters(server).get("events_acked") == 3 * COUNT
    if tls:
        assert len(auth.certificates) == 1


def _paho_publish(port: int, client_ctx: ssl.SSLContext | None) -> list[int]:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-client")
    if client_ctx is not None:
        client.tls_set_context(client_ctx)
    client.connect("localhost" if client_ctx else "127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        acked = []
        for qos in (1, 2, 0):
            for i in range(COUNT):
                info = client.publish(f"paho/q{qos}", f"{qos}-{i}".encode(), qos=qos)
                info.wait_for_publish(timeout=10)
                assert info.is_published()
                acked.append(qos)
        return acked
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_paho_every_qos_in_order(stage: RecordingStage, pki: Pki, tls: bool) -> None:
    server_ctx, client_ctx = _tls(pki, tls)
    async with running_server(stage, ssl_context=server_ctx) as server:
        acked = await asyncio.to_thread(_paho_publish, server.port, client_ctx)
        assert len(acked) == 3 * COUNT
        await stage.wait_for(3 * COUNT)
    for qos in (0, 1, 2):
        assert stage.payloads(f"paho/q{qos}") == [f"{qos}-{i}".encode() for i in range(COUNT)]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_mosquitto_pub_lines(stage: RecordingStage, pki: Pki, tls: bool, qos: int) -> None:
    server_ctx = pki.server_context() if tls else None
    device = pki.device(f"mqpub-{uuid.uuid4().hex[:8]}")
    lines = [f"line {i}" for i in range(COUNT)]
    async with running_server(stage, ssl_context=server_ctx) as server:
        argv = [MOSQUITTO_PUB, "-p", str(server.port), "-t", f"cli/q{qos}", "-q", str(qos), "-l"]
        argv += ["-i", "mosquitto-pub", "-h", "localhost" if tls else "127.0.0.1"]
        if tls:
            argv += ["--cafile", str(pki.ca_cert), "--cert", str(device.cert)]
            argv += ["--key", str(device.key)]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(
            process.communicate("\n".join(lines).encode() + b"\n"), timeout=30
        )
        assert process.returncode == 0, err
        await stage.wait_for(COUNT)
    assert stage.payloads() == [line.encode() for line in lines]
    assert {e.qos for e in stage.events} == {qos}


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_a_resumed_tls_session_is_refused(
    stage: RecordingStage, pki: Pki, version: ssl.TLSVersion
) -> None:
    """A resumed handshake verifies no certificate: the one it reports was checked against the
    CA and CRL of an earlier handshake. The sink's own context offers no resumption; this server
    context (Python's defaults) does, and the server must refuse what comes of it."""
    server_ctx, client_ctx = _tls(pki, True)
    assert client_ctx is not None
    client_ctx.maximum_version = version
    auth = CertificateIdentity()
    hello = connect_packet("resumer")
    async with running_server(stage, ssl_context=server_ctx, authenticator=auth) as server:
        first, session, reused = await asyncio.to_thread(
            tls_connect, server.port, client_ctx, hello
        )
        assert (first, reused) == (b"\x20\x02\x00\x00", False)
        again, _, reused = await asyncio.to_thread(
            tls_connect, server.port, client_ctx, hello, session
        )
        assert reused, "the client could not resume: this test shows nothing"
        assert again == b"\x20\x02\x00\x05"  # not authorized
        assert counters(server).get("connections_refused", reason="tls session resumed") == 1
    assert len(auth.certificates) == 1


async def test_tls_handshake_and_connect_share_one_deadline(
    stage: RecordingStage, pki: Pki
) -> None:
    """connect_timeout covers the TLS handshake and the CONNECT together: a client that takes
    0.7 s to start its handshake and then sends nothing is closed 1 s after it connected, not
    1 s after its handshake (each used to get its own connect_timeout)."""
    server_ctx, client_ctx = _tls(pki, True)
    assert client_ctx is not None
    loop = asyncio.get_running_loop()
    async with running_server(
        stage, ssl_context=server_ctx, limits=Limits(connect_timeout=1.0)
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        connected = loop.time()
        await asyncio.sleep(0.7)
        await writer.start_tls(client_ctx, server_hostname="localhost")
        assert await reader.read(1) == b""  # closed by the server, nothing sent
        assert loop.time() - connected < 1.5
        writer.close()
        assert counters(server).get("connections_refused", reason="connect_timeout") == 1


async def test_sockets_still_in_the_tls_handshake_count_against_max_connections(
    stage: RecordingStage, pki: Pki
) -> None:
    """asyncio's TLS listener handed a connection over only after its handshake: sockets that
    never finished one were not counted (max_connections 3 held 101 of 300)."""
    server_ctx, client_ctx = _tls(pki, True)
    limits = Limits(max_connections=3, connect_timeout=5.0)
    async with running_server(stage, ssl_context=server_ctx, limits=limits) as server:
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
        async with asyncio.timeout(5):
            while counters(server).get("connections_refused", reason="max_connections") < 7:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert server.connection_count == 3
        for _, writer in silent:
            writer.close()
        async with asyncio.timeout(5):
            while server.connection_count:  # noqa: ASYNC110  # polling a counter
                await asyncio.sleep(0.01)
        async with aiomqtt.Client(
            "localhost", server.port, identifier="after", tls_context=client_ctx
        ) as client:
            await client.publish("t", b"in", qos=1, timeout=5)
    assert stage.payloads("t") == [b"in"]


async def test_stop_during_a_tls_handshake_stops_cleanly(stage: RecordingStage, pki: Pki) -> None:
    """A socket mid-handshake at stop: aborting its transport made start_tls return no transport
    on Python 3.11; the connection task failed and took the server's stop down with it."""
    server_ctx, _ = _tls(pki, True)
    server = IngestServer(stage=stage, authenticator=Anonymous(), ssl_context=server_ctx)
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)  # no ClientHello
        async with asyncio.timeout(5):
            while not server.connection_count:  # noqa: ASYNC110  # polling a counter
                await asyncio.sleep(0.01)
    writer.close()
    assert counters(server).get("connections_closed", reason="server_stop") == 1
    assert counters(server).get("connections_closed", reason="internal_error") == 0
