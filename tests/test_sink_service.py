"""``cloud-sink run`` as a real process: mutual TLS, a device-signed JWT, the sqlite core queue."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiomqtt
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs import device_uri
from cloud_sink.backends import SqliteCoreQueue, read_messages
from cloud_sink.config import SinkConfig, parse_config
from cloud_sink.service import Sink
from tests.harness.brokers import NatsNames, RabbitNames, drain_queue, read_stream
from tests.harness.notify import NotifySocket
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ProcessFactory
from tests.harness.sink import (
    AUD,
    CLOUD_SINK,
    amqp_backend,
    core_message,
    device_token,
    sink_cli,
    write_sink_config,
)


async def test_device_publishes_through_the_sink_into_the_core_queue(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    config = write_sink_config(tmp_path, pki)
    sink = process_factory(
        [CLOUD_SINK, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
    )
    device = pki.device(f"sink-dev-{uuid.uuid4().hex[:6]}")
    topic = f"devices/{device.device_id}/temp"
    async with aiomqtt.Client(
        "localhost", sink.port, identifier=device.device_id, username=device.device_id,
        password=device_token(device), tls_context=pki.client_context(device),
    ) as client:  # fmt: skip
        for i in range(10):
            await client.publish(topic, f"{i}".encode(), qos=1 + i % 2)
    # Acked means in the core queue, readable while the sink runs.
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    assert [m.payload for m in stored] == [f"{i}".encode() for i in range(10)]
    assert {m.device_id for m in stored} == {device.device_id}
    tail = await asyncio.to_thread(sink_cli, config, "tail", "--json")
    assert [json.loads(line)["payload"] for line in tail.stdout.splitlines()] == [
        f"{i}" for i in range(10)
    ]
    # A token signed by another key: refused at CONNECT, nothing stored.
    forged = jwt.encode(
        {
            "sub": device.device_id,
            "aud": AUD,
            "iat": int(time.time()),
            "exp": int(time.time()) + 60,
        },
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
    )
    with pytest.raises(aiomqtt.MqttCodeError):
        async with aiomqtt.Client(
            "localhost", sink.port, identifier=device.device_id, username=device.device_id,
            password=forged, tls_context=pki.client_context(device),
        ):  # fmt: skip
            pass
    assert "bad signature" in sink.output()
    assert await sink.asigterm() == 0
    assert "cloud-sink stopped" in sink.output()
    assert len(list(read_messages(tmp_path / "core.db"))) == 10


async def test_issue_token_mints_a_certificate_bound_issuer_token(tmp_path: Path, pki: Pki) -> None:
    issuer = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "issuer.key"
    key_path.write_bytes(
        issuer.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    device = pki.device(f"issued-{uuid.uuid4().hex[:6]}")
    result = await asyncio.to_thread(
        subprocess.run,
        [CLOUD_SINK, "issue-token", "--device", device.device_id, "--cert", str(device.cert),
         "--key", str(key_path), "--kid", "k1", "--issuer", "https://iss", "--audience", AUD,
         "--ttl", "120"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(
        result.stdout.strip(), issuer.public_key(), algorithms=["ES256"], audience=AUD
    )
    assert claims["sub"] == device.device_id
    assert claims["exp"] - claims["iat"] == 120
    assert "x5t#S256" in claims["cnf"]
    assert jwt.get_unverified_header(result.stdout.strip())["kid"] == "k1"
    # Refused before minting what the sink would refuse, or what makes no sense.
    other = pki.device(f"other-{uuid.uuid4().hex[:6]}")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        issuer.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    for change, message in (
        (("--device", other.device_id), f"not of '{other.device_id}'"),
        (("--ttl", "-600"), "a lifetime is 1 s at least"),
        (("--ttl", "nan"), "a lifetime is 1 s at least"),
        (("--ttl", "inf"), "a lifetime is 1 s at least"),
        (("--ttl", "0.5"), "a lifetime is 1 s at least"),  # exp was iat: whole seconds
        (("--key", str(encrypted)), "is encrypted: give the key without a passphrase"),
    ):
        argv = [CLOUD_SINK, "issue-token", "--device", device.device_id, "--cert",
                str(device.cert), "--key", str(key_path), "--kid", "k1", "--issuer",
                "https://iss", "--audience", AUD, *change]  # fmt: skip
        refused = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
        )
        assert refused.returncode != 0, change
        assert refused.stdout == ""
        assert message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


async def _publish_through_sink(config: SinkConfig, device: DeviceCreds, pki: Pki) -> None:
    async with Sink(config) as sink, aiomqtt.Client(
        "localhost", sink.port, identifier=device.device_id,
        username=device.device_id, password=device_token(device),
        tls_context=pki.client_context(device),
    ) as client:  # fmt: skip
        for i in range(5):
            await client.publish(f"devices/{device.device_id}/t", f"{i}".encode(), qos=1)


def _with_backend(tmp_path: Path, pki: Pki, backend: str) -> SinkConfig:
    text = write_sink_config(tmp_path, pki).read_text()
    text = text[: text.index("[backend]")] + backend
    return parse_config(text)


async def test_sink_into_rabbitmq(tmp_path: Path, pki: Pki, rabbitmq: RabbitNames) -> None:
    config = _with_backend(tmp_path, pki, amqp_backend(rabbitmq))
    device = pki.device(f"amqp-dev-{uuid.uuid4().hex[:6]}")
    await _publish_through_sink(config, device, pki)
    received = await drain_queue(rabbitmq.url, rabbitmq.queue, expected=5, timeout=10)
    assert [m.body for m in received] == [f"{i}".encode() for i in range(5)]
    assert all(m.headers["device-id"] == device.device_id for m in received)
    assert len({m.message_id for m in received}) == 5


async def test_sink_into_nats_jetstream(
    tmp_path: Path, pki: Pki, nats_jetstream: NatsNames
) -> None:
    names = nats_jetstream
    config = _with_backend(
        tmp_path,
        pki,
        f'[backend]\ntype = "nats"\nurl = "{names.url}"\nstream = "{names.stream}"\n'
        f'subject_prefix = "{names.subject_prefix}"\n'
        f'dead_letter_stream = "{names.dead_letter_stream}"\n'
        f'dead_letter_subject_prefix = "{names.dead_letter_subject_prefix}"\n',
    )
    device = pki.device(f"nats-dev-{uuid.uuid4().hex[:6]}")
    await _publish_through_sink(config, device, pki)
    stored = await read_stream(names.url, names.stream, expected=5, timeout=10)
    assert [m.body for m in stored] == [f"{i}".encode() for i in range(5)]
    assert {m.subject for m in stored} == {f"{names.subject_prefix}.devices.{device.device_id}.t"}


async def test_issue_token_accepts_the_device_id_of_the_san_uri(tmp_path: Path, pki: Pki) -> None:
    """With [auth] identity = "san-uri" a certificate's CN may be anything (an externally
    issued one): its device SAN URI names the device, and issue-token accepts that too."""
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = f"gw-{uuid.uuid4().hex[:6]}"
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gateway 12 (plant A)")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))]),
            critical=False,
        )
        .sign(pki.ca.key, hashes.SHA256())
    )
    cert_path = tmp_path / "external.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = tmp_path / "issuer.key"
    key_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    argv = [CLOUD_SINK, "issue-token", "--cert", str(cert_path), "--key", str(key_path),
            "--kid", "k1", "--issuer", "https://iss", "--audience", AUD]  # fmt: skip
    for device, accepted in ((device_id, True), ("Gateway 12 (plant A)", True), ("gw-x", False)):
        result = await asyncio.to_thread(
            subprocess.run, [*argv, "--device", device], capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert (result.returncode == 0) is accepted, (device, result.stderr)


def test_tail_of_a_core_queue_not_set_up_or_not_one(tmp_path: Path, pki: Pki) -> None:
    """An empty file (the sink creating it) crashed `tail` with a traceback, and so did a file
    that is not a database."""
    config = write_sink_config(tmp_path, pki)
    core = tmp_path / "core.db"
    core.touch()
    done = sink_cli(config, "tail")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    core.write_text("not a database, " * 100)
    done = sink_cli(config, "tail")
    assert done.returncode == 1
    assert done.stderr.startswith(f"cloud-sink: cannot read the core queue {core}: "), done.stderr
    assert "Traceback" not in done.stderr


async def test_tail_follows_a_replaced_core_queue_and_ends_quietly(
    tmp_path: Path, pki: Pki
) -> None:
    """A core queue replaced under `tail --follow` (restored, recreated) starts its positions
    over: its events were never printed. Ctrl-C ended it with a traceback."""
    config = write_sink_config(tmp_path, pki)
    core = tmp_path / "core.db"

    async def fill(path: Path, count: int, device: str) -> None:
        queue = await SqliteCoreQueue.open(path)
        await queue.publish([core_message(seq, device) for seq in range(1, count + 1)])
        await queue.aclose()

    await fill(core, 3, "dev-old")
    follower = await asyncio.create_subprocess_exec(
        CLOUD_SINK, "--config", str(config), "tail", "--follow",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # Ctrl-C as at a terminal: a test run started in the background (`cmd &` in a script)
        # ignores SIGINT, its children inherit that, and Python then never raises
        # KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        await asyncio.sleep(1.5)
        await fill(tmp_path / "new.db", 2, "dev-new")
        os.replace(tmp_path / "new.db", core)
        await asyncio.sleep(1.5)
    finally:
        follower.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            out, err = await follower.communicate()
    assert follower.returncode == 0, err
    assert b"Traceback" not in err
    devices = [line.split()[0].split("/")[0] for line in out.decode().splitlines()]
    assert devices == ["dev-old"] * 3 + ["dev-new"] * 2


def test_cli_errors_are_one_line_with_the_exit_code_systemd_expects(
    tmp_path: Path, pki: Pki
) -> None:
    """A port out of range passed to bind() and a core queue path that is a directory were
    tracebacks with exit 1; a usage error is 2 (systemd does not restart it)."""
    config = write_sink_config(tmp_path, pki)
    done = sink_cli(config, "run", "--listen-port", "70000")
    assert done.returncode == 2
    assert "70000 is not a port: 0 (any free port) to 65535" in done.stderr
    (tmp_path / "core.db").mkdir()
    done = sink_cli(config, "run", "--listen-port", "0")
    assert done.returncode == 1
    assert done.stderr.startswith(f"cloud-sink: cannot open the core queue {tmp_path}/core.db")
    assert "Traceback" not in done.stderr


async def test_a_stop_while_the_core_queue_is_connected_ends_the_start(
    tmp_path: Path, pki: Pki
) -> None:
    """SIGTERM while the sink connected to a core queue that did not answer was only acted on
    once the connect timed out (12 s here), and `run` then exited 1: a `systemctl stop` during a
    start waited, and left the unit "failed". systemd is told STOPPING=1 (it was told nothing),
    and never READY=1."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = write_sink_config(tmp_path, pki)
    text = config.read_text()
    config.write_text(
        text[: text.index("[backend]")]
        + f'[backend]\ntype = "amqp"\nurl = "amqp://guest:guest@127.0.0.1:{port}/"\n'
        + 'timeout = "12s"\n'
    )
    with NotifySocket() as sd:
        sink = await asyncio.create_subprocess_exec(
            CLOUD_SINK, "--config", str(config), "run",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "NOTIFY_SOCKET": sd.address},
        )  # fmt: skip
        try:
            async with asyncio.timeout(10):
                while not held:  # noqa: ASYNC110  # the sink is connecting
                    await asyncio.sleep(0.05)
            started = time.monotonic()
            sink.send_signal(signal.SIGTERM)
            async with asyncio.timeout(8):
                _, err = await sink.communicate()
        finally:
            if sink.returncode is None:
                sink.kill()
                await sink.wait()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()
        stopping = sd.wait_for(lambda n: n.fields.get("STOPPING") == "1", 5)
        ready = sd.with_field("READY")
    assert sink.returncode == 0, err
    assert time.monotonic() - started < 8
    assert b"cloud-sink stopped while starting" in err
    assert stopping.fields == {"STOPPING": "1", "STATUS": "stopped while starting"}
    assert not ready, ready
