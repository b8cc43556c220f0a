"""Our PKI against an independent TLS stack: Mosquitto with ``require_certificate true``."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import uuid

import pytest

from tests.harness.mosquitto import MosquittoBroker, MosquittoFactory
from tests.harness.pki import DeviceCreds, Pki

pytestmark = pytest.mark.integration

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"


def publish_tls(
    broker: MosquittoBroker, pki: Pki, creds: DeviceCreds
) -> subprocess.CompletedProcess[str]:
    assert broker.tls_port is not None
    return subprocess.run(
        [
            MOSQUITTO_PUB, "-h", "localhost", "-p", str(broker.tls_port), "-V", "mqttv311",
            "--cafile", str(pki.ca_cert), "--cert", str(creds.cert), "--key", str(creds.key),
            "-i", creds.device_id, "-t", f"devices/{creds.device_id}/t", "-m", "x", "-q", "1",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_plain_listener_round_trip(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(tls=False)
    topic = f"harness/{uuid.uuid4().hex}"
    with subprocess.Popen(
        [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-C", "1",
         "-W", "20"],
        stdout=subprocess.PIPE, text=True,
    ) as sub:  # fmt: skip
        # mosquitto_sub has subscribed once the broker logs its client; publish retained to be safe.
        pub = subprocess.run(
            [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-m", "hi",
             "-r"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert pub.returncode == 0, pub.stderr
        out, _ = sub.communicate(timeout=30)
    assert sub.returncode == 0
    assert out.strip() == "hi"


def test_tls_listener_accepts_our_device_and_refuses_foreign(
    mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory()
    good = publish_tls(broker, pki, pki.device("mq-good"))
    assert good.returncode == 0, good.stderr
    foreign = publish_tls(broker, pki, pki.foreign_device("mq-foreign"))
    assert foreign.returncode != 0
    expired = publish_tls(broker, pki, pki.expired_device("mq-expired"))
    assert expired.returncode != 0
    future = publish_tls(broker, pki, pki.future_device("mq-future"))
    assert future.returncode != 0
    assert "mq-good" in broker.log()


def test_tls_listener_refuses_a_client_without_certificate(
    mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    import socket

    broker = mosquitto_factory()
    assert broker.tls_port is not None
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", broker.tls_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
        # TLS 1.3 reports the missing certificate on the first read, not in the handshake.
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        _send_and_read_one_byte(tls)


def _send_and_read_one_byte(tls: ssl.SSLSocket) -> None:
    tls.sendall(b"\x10\x00")
    if not tls.recv(1):
        raise ConnectionResetError("closed by the broker")


def test_crl_refuses_a_revoked_device(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    revoked = pki.revoked_device("mq-revoked")
    good = pki.device("mq-still-good")
    broker = mosquitto_factory(crl=pki.crl)
    assert publish_tls(broker, pki, revoked).returncode != 0
    result = publish_tls(broker, pki, good)
    assert result.returncode == 0, result.stderr
