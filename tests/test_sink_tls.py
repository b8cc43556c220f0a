"""The sink's TLS context: a new CRL takes effect without a restart (SPEC §6), on SIGHUP and when
the file changes; a CRL that cannot be trusted is refused and the previous one kept."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import shutil
import signal
import sqlite3
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from cloud_sink.config import ConfigError, SinkConfig, parse_config
from cloud_sink.service import Sink
from cloud_sink.tls import TlsError, check_crl
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ProcessFactory
from tests.harness.rawmqtt import connect_packet, tls_connect
from tests.harness.sink import CLOUD_SINK, device_token, write_sink_config


def crl_config(tmp_path: Path, pki: Pki, crl: Path, interval: str) -> Path:
    path = write_sink_config(tmp_path, pki)
    path.write_text(
        path.read_text().replace(
            "[auth]", f'crl = "{crl}"\ncrl_check_interval = "{interval}"\n\n[auth]'
        )
    )
    return path


def own_crl(tmp_path: Path, pki: Pki) -> Path:
    """A copy of the CA's current CRL that only this test replaces."""
    crl = tmp_path / "crl.pem"
    pki.ca.write_crl(crl)
    return crl


async def connects(port: int, device: DeviceCreds, pki: Pki) -> bool:
    """Whether ``device`` gets through the handshake and CONNECT and one QoS 1 publish."""
    try:
        async with aiomqtt.Client(
            "localhost", port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=pki.client_context(device), timeout=3,
        ) as client:  # fmt: skip
            await client.publish(f"devices/{device.device_id}/t", b"x", qos=1, timeout=5)
    except aiomqtt.MqttError:
        return False
    return True


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  # polling a counter
            await asyncio.sleep(0.05)


def loaded(config: Path) -> SinkConfig:
    return parse_config(config.read_text())


async def test_changed_crl_file_refuses_the_revoked_device_without_a_restart(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_sink")
    crl = own_crl(tmp_path, pki)
    victim = pki.device(f"crl-victim-{uuid.uuid4().hex[:6]}")
    other = pki.device(f"crl-other-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "0.2s"))) as sink:
        assert await connects(sink.port, victim, pki)
        pki.ca.revoke(victim.device_id)
        pki.ca.write_crl(crl)  # replaced atomically: a new inode, mtime and size
        await until(lambda: sink.tls.reloads == 1)
        assert not await connects(sink.port, victim, pki), "revoked device still let in"
        assert await connects(sink.port, other, pki)
        assert sink.tls.refusals == 0
    assert any("CRL file changed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("breakage", ["garbage", "certificate", "other CA", "empty"])
async def test_untrustworthy_crl_is_refused_and_the_previous_one_kept(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    revoked = pki.device(f"crl-keep-{uuid.uuid4().hex[:6]}")
    pki.ca.revoke(revoked.device_id)
    crl = own_crl(tmp_path, pki)
    good = pki.device(f"crl-good-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "0.2s"))) as sink:
        assert not await connects(sink.port, revoked, pki)
        if breakage == "garbage":
            crl.write_bytes(
                b"-----BEGIN X509 CRL-----\nnot base64 at all\n-----END X509 CRL-----\n"
            )
        elif breakage == "certificate":
            # Loaded as a CRL file, a CA certificate would become a trust anchor.
            shutil.copyfile(pki.other_ca.cert_path, crl)
        elif breakage == "other CA":
            pki.other_ca.write_crl(crl)
        else:
            crl.write_bytes(b"")
        await until(lambda: sink.tls.refusals == 1)
        assert sink.tls.reloads == 0
        assert not await connects(sink.port, revoked, pki), "the old CRL was dropped"
        assert await connects(sink.port, good, pki)
    assert any("refused, keeping the previous" in r.getMessage() for r in caplog.records)


def test_check_crl_reports_the_reason(tmp_path: Path, pki: Pki) -> None:
    crl = own_crl(tmp_path, pki)
    assert check_crl(crl, pki.ca_cert) >= 0
    pki.other_ca.write_crl(crl)
    with pytest.raises(TlsError, match="not signed by the CA"):
        check_crl(crl, pki.ca_cert)
    shutil.copyfile(pki.ca_cert, crl)
    with pytest.raises(TlsError, match="X509 CRL"):
        check_crl(crl, pki.ca_cert)
    with pytest.raises(TlsError, match="cannot read"):
        check_crl(tmp_path / "missing.pem", pki.ca_cert)


async def test_sighup_reloads_the_crl_of_a_running_sink(
    tmp_path: Path, pki: Pki, process_factory: ProcessFactory
) -> None:
    crl = own_crl(tmp_path, pki)
    # Polling effectively off: only the signal can make this reload happen.
    config = crl_config(tmp_path, pki, crl, "1h")
    sink = process_factory(
        [CLOUD_SINK, "--config", str(config), "run", "--listen-port", "{port}"],
        ready=r"listening on 127\.0\.0\.1:(?P<port>\d+)",
        name="cloud-sink",
    )
    victim = pki.device(f"hup-victim-{uuid.uuid4().hex[:6]}")
    other = pki.device(f"hup-other-{uuid.uuid4().hex[:6]}")
    assert await connects(sink.port, victim, pki)
    pki.ca.revoke(victim.device_id)
    pki.ca.write_crl(crl)
    sink.signal(signal.SIGHUP)
    await until(lambda: "TLS context reloaded (SIGHUP)" in sink.output())
    assert sink.running
    assert not await connects(sink.port, victim, pki)
    assert await connects(sink.port, other, pki)
    assert await sink.asigterm() == 0


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_no_tls_session_resumption_so_a_revoked_device_cannot_resume(
    tmp_path: Path, pki: Pki, version: ssl.TLSVersion
) -> None:
    """A resumed handshake would not verify the certificate again (nor the new CRL): the sink
    offers no resumption, so a device revoked since its last connection cannot get back in
    with its saved TLS session (it did before: CONNACK 0 with ``session_reused``)."""
    crl = own_crl(tmp_path, pki)
    victim = pki.device(f"resume-{uuid.uuid4().hex[:6]}")
    context = pki.client_context(victim)
    context.maximum_version = version
    hello = connect_packet(
        victim.device_id, username=victim.device_id, password=device_token(victim).encode()
    )
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "0.2s"))) as sink:
        first, session, _ = await asyncio.to_thread(tls_connect, sink.port, context, hello)
        assert first == b"\x20\x02\x00\x00"
        if version == ssl.TLSVersion.TLSv1_2:
            # Python keeps a server-side session cache: the offer fails the handshake, and the
            # client's next attempt without the session gets in.
            again, _, _ = await asyncio.to_thread(tls_connect, sink.port, context, hello, session)
            assert again == b""
            assert sink.tls.resumptions_refused == 1
        again, session, reused = await asyncio.to_thread(tls_connect, sink.port, context, hello)
        assert (again, reused) == (b"\x20\x02\x00\x00", False)
        pki.ca.revoke(victim.device_id)
        pki.ca.write_crl(crl)
        await until(lambda: sink.tls.reloads == 1)
        refused, _, reused = await asyncio.to_thread(
            tls_connect, sink.port, context, hello, session
        )
        assert not reused
        assert refused == b"", f"revoked device answered {refused!r}"


async def test_the_tls_read_buffer_is_the_configured_size(tmp_path: Path, pki: Pki) -> None:
    """asyncio allocates its TLS read buffer (256 KiB by default) zeroed for every connection:
    the sink sets the configured size; a payload several times larger still arrives whole."""
    device = pki.device(f"buf-{uuid.uuid4().hex[:6]}")
    config = write_sink_config(tmp_path, pki)
    config.write_text(config.read_text().replace("[auth]", 'tls_read_buffer = "16KiB"\n\n[auth]'))
    payload = bytes(range(256)) * 400  # 100 KiB
    async with Sink(loaded(config)) as sink:
        assert asyncio.sslproto.SSLProtocol.max_size == 16 * 1024
        async with aiomqtt.Client(
            "localhost", sink.port, identifier=device.device_id, username=device.device_id,
            password=device_token(device), tls_context=pki.client_context(device), timeout=5,
        ) as client:  # fmt: skip
            await client.publish(f"devices/{device.device_id}/big", payload, qos=1, timeout=10)
    with sqlite3.connect(tmp_path / "core.db") as db:
        assert db.execute("SELECT payload FROM events").fetchall() == [(payload,)]
    too_small = config.read_text().replace('tls_read_buffer = "16KiB"', 'tls_read_buffer = "8KiB"')
    with pytest.raises(ConfigError, match=r"listener\.tls_read_buffer"):
        parse_config(too_small)
