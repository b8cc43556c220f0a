"""The sink's TLS context: a new CRL takes effect without a restart (SPEC §6), on SIGHUP and when
the file changes; a CRL that cannot be trusted is refused and the previous one kept."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import datetime as dt
import logging
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ObjectIdentifier, UnrecognizedExtension
from cryptography.x509.oid import CRLEntryExtensionOID, NameOID

from certs import CertificateAuthority, KeyType, crls
from cloud_sink.config import ConfigError, SinkConfig, parse_config
from cloud_sink.service import Sink
from cloud_sink.tls import (
    TlsError,
    TlsReloader,
    TrustStore,
    build_context,
    certificate_key,
    check_crl,
)
from mqtt_ingest import crl as crl_module
from mqtt_ingest.crl import crl_rollback, load_crl
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.process import ProcessFactory
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet, tls_connect
from tests.harness.sink import CLOUD_SINK, device_token, write_sink_config
from tests.test_uplink_faults import SkewedClock


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


async def test_the_sink_is_not_ready_once_its_crl_expires(tmp_path: Path, pki: Pki) -> None:
    """Past its next update the CRL makes OpenSSL refuse every device, and /readyz said ready:
    a load balancer kept sending devices to the one instance whose CRL went stale."""
    crl = pki.ca.write_crl(tmp_path / "short.pem", days=3 / 86400)  # 3 s (and 5 min backdated)
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "1h"))) as sink:
        assert sink.not_ready() is None
        await until(lambda: sink.not_ready() is not None, timeout=10)
        reason = sink.not_ready()
        assert reason is not None
        assert reason.startswith(f"CRL {crl} expired at "), reason
        assert reason.endswith(": every device is refused")


@pytest.mark.parametrize("breakage", ["garbage", "certificate", "other CA", "empty", "older"])
async def test_untrustworthy_crl_is_refused_and_the_previous_one_kept(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    """ "older": a CRL put back from a backup (or replayed by whoever can write the file) let in
    again every device revoked since."""
    revoked = pki.device(f"crl-keep-{uuid.uuid4().hex[:6]}")
    older = pki.ca.write_crl(tmp_path / "older.pem")  # before the revocation
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
            os.replace(pki.other_ca.write_crl(tmp_path / "foreign.pem"), crl)
        elif breakage == "older":
            os.replace(older, crl)
        else:
            crl.write_bytes(b"")
        await until(lambda: sink.tls.refusals == 1)
        assert sink.tls.reloads == 0
        assert not await connects(sink.port, revoked, pki), "the old CRL was dropped"
        assert await connects(sink.port, good, pki)
    assert any("refused, keeping the previous" in r.getMessage() for r in caplog.records)


def test_check_crl_reports_the_reason(tmp_path: Path, pki: Pki) -> None:
    crl = own_crl(tmp_path, pki)
    loaded_crl = check_crl(crl, pki.ca_cert)
    assert loaded_crl.next_update_utc is not None
    # OpenSSL refuses every client certificate against a CRL outside its validity: so do we.
    later = loaded_crl.next_update_utc + dt.timedelta(seconds=1)
    with pytest.raises(TlsError, match=r"expired at .* every device would be refused"):
        check_crl(crl, pki.ca_cert, now=later)
    earlier = loaded_crl.last_update_utc - dt.timedelta(seconds=1)
    with pytest.raises(TlsError, match="not valid before"):
        check_crl(crl, pki.ca_cert, now=earlier)
    os.replace(pki.other_ca.write_crl(tmp_path / "foreign.pem"), crl)
    with pytest.raises(TlsError, match="not signed by the CA"):
        check_crl(crl, pki.ca_cert)
    shutil.copyfile(pki.ca_cert, crl)
    with pytest.raises(TlsError, match="X509 CRL"):
        check_crl(crl, pki.ca_cert)
    with pytest.raises(TlsError, match="cannot read"):
        check_crl(tmp_path / "missing.pem", pki.ca_cert)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str | None:
    """An in-memory TLS handshake: None if it completed, else the error."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [
        client.wrap_bio(client_in, client_out, server_hostname="localhost"),
        server.wrap_bio(server_in, server_out, server_side=True),
    ]
    done: set[int] = set()
    for _ in range(20):
        for index, end in enumerate(ends):
            try:
                if index not in done:
                    end.do_handshake()
                    done.add(index)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return str(exc)
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    if len(done) < 2:
        return "no progress"
    try:  # TLS 1.3: the client learns of a refusal at its first read
        ends[0].read(1)
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        return str(exc)
    return None


def crl_with(pki: Pki, extension: x509.ExtensionType, critical: bool) -> bytes:
    now = dt.datetime.now(dt.UTC)
    key = pki.ca.key
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.certificate.subject)
        .last_update(now - dt.timedelta(hours=1))
        .next_update(now + dt.timedelta(days=1))
        .add_extension(extension, critical=critical)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


UNKNOWN = UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")


@pytest.mark.parametrize(
    ("extension", "critical", "problem", "openssl_refuses"),
    [
        (UNKNOWN, True, "critical extension OpenSSL cannot handle", True),
        (x509.IssuingDistributionPoint(None, None, False, True, None, False, False), True,
         "limits its scope", True),
        (x509.IssuingDistributionPoint(None, None, False, False, None, False, True), True,
         "limits its scope", True),
        # OpenSSL takes it for a full CRL: it would miss every revocation of the base CRL.
        (x509.DeltaCRLIndicator(1), True, "delta CRL", False),
        (UNKNOWN, False, "", False),
        (x509.IssuingDistributionPoint(None, None, True, False, None, False, False), True, "",
         False),
    ],
    ids=["critical-unknown", "only-ca", "only-attributes", "delta", "non-critical", "only-user"],
)  # fmt: skip
def test_a_crl_openssl_would_refuse_every_device_with_is_refused_first(
    tmp_path: Path,
    pki: Pki,
    extension: x509.ExtensionType,
    critical: bool,
    problem: str,
    openssl_refuses: bool,
) -> None:
    """check_crl let these through, and OpenSSL then refused every device ("unhandled critical
    CRL extension", "different CRL scope"). The handshake shows what OpenSSL does with each."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes(crl_with(pki, extension, critical))
    server = pki.server_context()
    server.load_verify_locations(cafile=str(crl))  # as OpenSSL alone would take it
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    device = pki.client_context(pki.device(f"scope-{uuid.uuid4().hex[:6]}"))
    assert (handshake(server, device) is not None) == openssl_refuses
    if problem:
        with pytest.raises(TlsError, match=problem):
            check_crl(crl, pki.ca_cert)
    else:
        check_crl(crl, pki.ca_cert)


def test_the_crl_loaded_is_the_crl_checked(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was read twice, to check it and by OpenSSL: one replaced in between (here by
    another CA's CRL, with which OpenSSL refuses every device) was used unchecked."""
    crl = own_crl(tmp_path, pki)
    checked = crl_module._checked

    def replaced_meanwhile(*args: Any) -> x509.CertificateRevocationList:
        result = checked(*args)
        os.replace(pki.other_ca.write_crl(tmp_path / "foreign.pem"), crl)
        return result

    monkeypatch.setattr(crl_module, "_checked", replaced_meanwhile)
    context = build_context(loaded(crl_config(tmp_path, pki, crl, "5s")).listener)
    device = pki.client_context(pki.device(f"toctou-{uuid.uuid4().hex[:6]}"))
    assert handshake(context, device) is None


async def test_a_crl_replaced_while_the_sink_starts_is_loaded(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CRL file's version was taken after the file was read at start: a CRL replaced in
    between (a revocation landing as the sink starts) counted as loaded, and was never."""
    crl = own_crl(tmp_path, pki)
    listener = loaded(crl_config(tmp_path, pki, crl, "5s")).listener
    victim = pki.device(f"start-{uuid.uuid4().hex[:6]}")
    read = load_crl  # what cloud_sink.tls calls

    def replaced_once_read(
        context: ssl.SSLContext, crl_path: Path, ca_path: Path, *, refused: str
    ) -> tuple[x509.CertificateRevocationList, bytes]:
        monkeypatch.setattr("cloud_sink.tls.load_crl", read)
        result = read(context, crl_path, ca_path, refused=refused)
        pki.ca.revoke(victim.device_id)
        pki.ca.write_crl(crl)
        return result

    monkeypatch.setattr("cloud_sink.tls.load_crl", replaced_once_read)
    reloader = TlsReloader(listener, 0.05)
    key = certificate_key(x509.load_pem_x509_certificate(victim.cert.read_bytes()))
    assert key not in reloader.revocations  # the CRL read: before the revocation
    async with asyncio.TaskGroup() as tasks:
        watching = tasks.create_task(reloader.run(), name="test.tls_reload")
        try:
            await until(lambda: reloader.reloads == 1)
        finally:
            watching.cancel()
    assert key in reloader.revocations


def ca_and_crl(
    directory: Path, key: ec.EllipticCurvePrivateKey, number: int, *entries: x509.RevokedCertificate
) -> tuple[Path, x509.CertificateRevocationList]:
    """A CA named "Corp CA" with ``key``, written to ``directory``, and a CRL of it."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(name)
        .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(number), critical=False)
    )  # fmt: skip
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    crl = builder.sign(key, hashes.SHA256())
    (directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem", crl


def test_a_crl_of_a_rotated_ca_is_no_rollback_but_an_older_one_of_its_key_is(
    tmp_path: Path,
) -> None:
    """Found by review: a CA rotated under the same name (new key, CRL numbers from 1 again, as
    `openssl ca` with a fresh crlnumber file does) had its CRLs refused as older than the old
    key's, and with them the whole reload that installed the new CA."""
    old_key, new_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    _, in_use = ca_and_crl(tmp_path / "old", old_key, 57)
    new_ca, rotated = ca_and_crl(tmp_path / "new", new_key, 1)
    assert crl_rollback(rotated, in_use, new_ca) is None
    old_ca, older = ca_and_crl(tmp_path / "older", old_key, 56)
    assert crl_rollback(older, in_use, old_ca) == (
        "its CRL number 56 is below 57, the CRL in use's"
    )


def test_a_crl_entry_cryptography_cannot_read_is_left_to_openssl(tmp_path: Path) -> None:
    """Reason code 7 is unused, and cryptography refuses to read it; OpenSSL does not mind."""
    now = dt.datetime.now(dt.UTC)
    entry = (
        x509.RevokedCertificateBuilder().serial_number(7).revocation_date(now)
        .add_extension(UnrecognizedExtension(CRLEntryExtensionOID.CRL_REASON, b"\x0a\x01\x07"),
                       critical=False)
        .build()
    )  # fmt: skip
    ca, _ = ca_and_crl(tmp_path, ec.generate_private_key(ec.SECP256R1()), 1, entry)
    check_crl(tmp_path / "crl.pem", ca)


def test_a_crl_needs_a_temporary_directory_and_says_so(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL loads the checked bytes from a private copy: without a usable temporary
    directory the error escaped as an OSError (out of the sink's TLS reload task)."""
    crl = own_crl(tmp_path, pki)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    context = pki.server_context()
    with pytest.raises(TlsError, match=r"cannot make the private copy .* \(\$TMPDIR\)"):
        load_crl(context, crl, pki.ca_cert, refused="x")


def test_a_crl_of_a_ca_whose_key_may_not_sign_crls_is_refused(tmp_path: Path) -> None:
    """OpenSSL: "key usage does not include CRL signing" for every device (an external CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enterprise CA")])
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(False, False, False, False, False, True, False, False, False)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    crl = (
        x509.CertificateRevocationListBuilder().issuer_name(name)
        .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TlsError, match="lacks cRLSign"):
        check_crl(tmp_path / "crl.pem", tmp_path / "ca.pem")


async def connected(
    port: int, device: DeviceCreds, pki: Pki, token: str | None = None
) -> RawClient:
    """An open MQTT connection of ``device`` (CONNACK accepted), with ``token`` if given."""
    client = await RawClient.open(port, ssl_context=pki.client_context(device))
    password = (token or device_token(device)).encode()
    name = device.device_id
    await client.send(connect_packet(name, username=name, password=password))
    connack = await client.read()
    assert connack is not None
    assert connack.body == b"\x00\x00"
    return client


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if "refused, keeping the previous context" in r.getMessage()
    ]  # fmt: skip


async def test_a_crl_that_lands_while_the_server_key_is_replaced_is_applied(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A new CRL refused because the server key was half replaced was done with: once the key
    was whole again nothing loaded it, and the devices it revokes stayed accepted. It is tried
    again at every look (the refusal said once), and meanwhile its revocations apply at CONNECT
    and to open connections."""
    caplog.set_level(logging.INFO, logger="cloud_sink.tls")
    crl = own_crl(tmp_path, pki)
    cert = shutil.copyfile(pki.server_cert, tmp_path / "server.pem")
    key = shutil.copyfile(pki.server_key, tmp_path / "server.key")
    config = crl_config(tmp_path, pki, crl, "0.2s")
    text = config.read_text().replace(str(pki.server_cert), str(cert))
    config.write_text(text.replace(str(pki.server_key), str(key)))
    victim, other = (pki.device(f"{n}-{uuid.uuid4().hex[:6]}") for n in ("rot", "ok"))
    async with Sink(loaded(config)) as sink:
        session = await connected(sink.port, victim, pki)
        whole = key.read_bytes()
        key.write_bytes(whole[: len(whole) // 2])  # the new key being copied in
        pki.ca.revoke(victim.device_id)
        pki.ca.write_crl(crl)
        await until(lambda: sink.tls.refusals == 1)
        assert await session.closed_within(5), "revoked device kept its session"
        assert not await connects(sink.port, victim, pki), "revoked device let in"
        assert sink.metrics.get("connections_refused", "certificate revoked") == 1
        assert await connects(sink.port, other, pki)  # the previous context serves
        await asyncio.sleep(1.0)  # five looks at the file
        assert (sink.tls.reloads, sink.tls.refusals) == (0, 1)
        key.write_bytes(whole)
        await until(lambda: sink.tls.reloads == 1)
        assert not await connects(sink.port, victim, pki)
        # Refused at the handshake now, by the new context: not at CONNECT.
        assert sink.metrics.get("connections_refused", "certificate revoked") == 1
        assert await connects(sink.port, other, pki)
    assert len(refusal_lines(caplog)) == 1, "a refusal retried is said once"
    assert "tried again every 0.2s" in refusal_lines(caplog)[0]


async def test_a_crl_not_valid_yet_is_applied_once_it_is(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRL whose last update was a few seconds ahead of this host's clock (the CA's clock
    ahead) was refused and done with: valid a moment later, it was never loaded. It is tried
    again at every look, and the refusal said once."""
    caplog.set_level(logging.INFO, logger="cloud_sink.tls")
    crl = own_crl(tmp_path, pki)
    victim = pki.device(f"early-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "0.2s"))) as sink:
        assert await connects(sink.port, victim, pki)
        pki.ca.revoke(victim.device_id)
        valid_from = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        early = pki.ca.build_crl(now=valid_from + crls._CRL_BACKDATE)
        assert early.last_update_utc <= valid_from
        (tmp_path / "crl.new").write_bytes(early.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp_path / "crl.new", crl)
        await until(lambda: sink.tls.refusals == 1)
        assert sink.tls.reloads == 0
        await until(lambda: sink.tls.reloads == 1)
        assert not await connects(sink.port, victim, pki), "revoked device let in"
        assert sink.tls.refusals == 1
    lines = refusal_lines(caplog)
    assert len(lines) == 1, "a refusal retried is said once"
    assert "not valid before" in lines[0]


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


async def test_an_expired_crl_is_refused_at_reload_and_its_end_announced(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired CRL would make OpenSSL refuse every device: the previous context stays; and
    the sink warns a day ahead of the CRL in use expiring, then says when it has."""
    crl = own_crl(tmp_path, pki)
    good = pki.device(f"crl-exp-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "0.2s"))) as sink:
        pki.ca.write_crl(crl, days=1e-9)  # next update already past by the time it is read
        await until(lambda: sink.tls.refusals == 1)
        assert await connects(sink.port, good, pki)
        in_use = sink.tls.crl
        assert in_use is not None
        assert in_use.next_update_utc is not None
        caplog.set_level(logging.WARNING, logger="cloud_sink.tls")
        for hours in (-23, -22):  # once only
            sink.tls.check_expiry(in_use.next_update_utc + dt.timedelta(hours=hours))
        sink.tls.check_expiry(in_use.next_update_utc + dt.timedelta(seconds=1))
    messages = [r.getMessage() for r in caplog.records if r.name == "cloud_sink.tls"]
    assert [m for m in messages if "install a fresh one before then" in m] != []
    assert len([m for m in messages if "install a fresh one before then" in m]) == 1
    assert len([m for m in messages if "expired at" in m and "every device is refused" in m]) == 1


async def test_a_device_denied_or_revoked_while_connected_is_disconnected(
    tmp_path: Path, pki: Pki
) -> None:
    """Credentials withdrawn take effect on open connections at the reload, not at the device's
    next CONNECT (which could be an hour away)."""
    crl = own_crl(tmp_path, pki)
    config = crl_config(tmp_path, pki, crl, "0.2s")
    victim, denied, other = (pki.device(f"{n}-{uuid.uuid4().hex[:6]}") for n in ("rv", "dn", "ok"))
    async with Sink(loaded(config)) as sink:
        clients = {}
        for device in (victim, denied, other):
            client = await RawClient.open(sink.port, ssl_context=pki.client_context(device))
            token = device_token(device).encode()
            await client.send(
                connect_packet(device.device_id, username=device.device_id, password=token)
            )
            connack = await client.read()
            assert connack is not None
            assert connack.body == b"\x00\x00"
            clients[device.device_id] = client
        pki.ca.revoke(victim.device_id)
        pki.ca.write_crl(crl)
        assert await clients[victim.device_id].closed_within(5), "revoked device kept its session"
        await until(lambda: sink.metrics.get("connections_closed", "revoked") == 1)
        text = config.read_text().replace("[auth]\n", f'[auth]\ndeny = ["{denied.device_id}"]\n')
        sink.reload(parse_config(text))
        assert await clients[denied.device_id].closed_within(5), "denied device kept its session"
        await until(lambda: sink.metrics.get("connections_closed", "denied") == 1)
        survivor = clients[other.device_id]
        topic = f"devices/{other.device_id}/t"
        await survivor.send(publish_packet(topic, b"x", qos=1, packet_id=1))
        ack = await survivor.read()
        assert ack is not None
        assert ack.kind == 4
        await survivor.aclose()


async def publishes(client: RawClient, device: DeviceCreds, packet_id: int = 1) -> None:
    """One QoS 1 publish on an open connection, acknowledged."""
    topic = f"devices/{device.device_id}/t"
    await client.send(publish_packet(topic, b"x", qos=1, packet_id=packet_id))
    ack = await client.read()
    assert ack is not None
    assert ack.kind == 4


def closings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if ": closing " in r.getMessage()]


async def test_a_reload_of_auth_settings_closes_the_connections_they_refuse(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload of [auth] judges the open connections as their CONNECT would be judged now: a
    device whose token the new settings refuse is disconnected at once, not when its token
    expires; a refused reload changes nothing."""
    caplog.set_level(logging.INFO, logger="mqtt_ingest")
    config = write_sink_config(tmp_path, pki)
    short, long = (pki.device(f"{n}-{uuid.uuid4().hex[:6]}") for n in ("short", "long"))
    async with Sink(loaded(config)) as sink:
        clients = {
            short.device_id: await connected(sink.port, short, pki, device_token(short, 300)),
            long.device_id: await connected(sink.port, long, pki, device_token(long, 3000)),
        }
        # Refused (a key file that is no key): nothing of it applies, no connection is judged.
        broken = tmp_path / "broken.pem"
        broken.write_text("not a key\n")
        text = config.read_text()
        refused = text.replace('audience = "sink.test"', 'audience = "elsewhere"').replace(
            "[auth]\n", f'[auth]\nissuer_keys = ["{broken}"]\n'
        )
        with pytest.raises(ValueError, match="broken"):
            sink.reload(parse_config(refused))
        for device in (short, long):
            await publishes(clients[device.device_id], device)
        # A shorter max_lifetime refuses the 3000 s token: that device goes, the other stays.
        sink.reload(parse_config(text.replace("[auth]\n", '[auth]\nmax_lifetime = "10m"\n')))
        assert await clients[long.device_id].closed_within(5), "refused device kept its session"
        await until(lambda: sink.metrics.get("connections_closed", "reauth_refused") == 1)
        await publishes(clients[short.device_id], short, packet_id=2)
        [line] = [m for m in closings(caplog) if long.device_id in m]
        assert "refused by the [auth] settings now: token lifetime 3000s over the maximum" in line
        # Another audience refuses every token issued for the old one.
        sink.reload(parse_config(text.replace('audience = "sink.test"', 'audience = "other"')))
        assert await clients[short.device_id].closed_within(5), "refused device kept its session"
        await until(lambda: sink.metrics.get("connections_closed", "reauth_refused") == 2)
        [line] = [m for m in closings(caplog) if short.device_id in m]
        assert line.endswith("refused by the [auth] settings now: wrong audience")
        assert sink.server.connection_count == 0


async def test_a_reload_to_issuer_signed_tokens_closes_device_signed_connections(
    tmp_path: Path, pki: Pki
) -> None:
    """A change of token mode applies to connections already open: a device-signed token is
    refused in issuer-signed mode (unknown kid) as at CONNECT."""
    config = write_sink_config(tmp_path, pki)
    device = pki.device(f"mode-{uuid.uuid4().hex[:6]}")
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "issuer-1.pem"
    key_file.write_bytes(
        issuer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    async with Sink(loaded(config)) as sink:
        client = await connected(sink.port, device, pki)
        auth = (
            '[auth]\nmode = "issuer-signed"\nissuer = "https://issuer.test"\n'
            f'issuer_keys = ["{key_file}"]\n'
        )
        sink.reload(parse_config(config.read_text().replace("[auth]\n", auth)))
        assert await client.closed_within(5), "device-signed session kept in issuer-signed mode"
        await until(lambda: sink.metrics.get("connections_closed", "reauth_refused") == 1)


async def test_a_reload_of_auth_keeps_a_healthy_device_signed_connection(
    tmp_path: Path, pki: Pki
) -> None:
    """A device-signed token must be issued within the leeway of its CONNECT (a device clock
    behind is refused there). The reload's re-check judges that as of the CONNECT: a connection
    open for ten minutes (its token's iat ten minutes old by now) is not closed for it."""
    config = write_sink_config(tmp_path, pki)  # leeway: the default 30 s
    device = pki.device(f"aged-{uuid.uuid4().hex[:6]}")
    clock = SkewedClock(0)
    async with Sink(loaded(config), clock=clock) as sink:
        client = await connected(sink.port, device, pki, device_token(device, ttl=3000))
        clock.offset = 600  # ten minutes later, as far as the token times go
        text = config.read_text().replace("[auth]\n", '[auth]\nleeway = "20s"\n')
        sink.reload(parse_config(text))
        await publishes(client, device)
        assert sink.metrics.get("connections_closed", "reauth_refused") == 0
        assert sink.server.connection_count == 1


async def test_a_reload_of_the_leeway_moves_the_end_of_open_connections(
    tmp_path: Path, pki: Pki
) -> None:
    """A connection ends at its token's exp + leeway: a reload that shortens the leeway ends it
    sooner (it would otherwise live on by the old leeway)."""
    config = write_sink_config(tmp_path, pki)  # leeway: the default 30 s
    device = pki.device(f"leeway-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(config)) as sink:
        client = await connected(sink.port, device, pki, device_token(device, ttl=3))
        sink.reload(parse_config(config.read_text().replace("[auth]\n", '[auth]\nleeway = "1s"\n')))
        await publishes(client, device)  # still valid: exp is ahead
        assert await client.closed_within(8), "the connection outlived exp + the new leeway"
        await until(lambda: sink.metrics.get("connections_closed", "expired") == 1)


def ca_bundle(path: Path, *authorities: Path) -> Path:
    path.write_bytes(b"".join(authority.read_bytes() for authority in authorities))
    return path


async def test_a_reload_that_drops_a_ca_closes_the_connections_it_verified(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA taken out of the CA file (or replaced) takes its devices' open connections with it
    at the reload, as their next handshake would be refused; a reload that leaves the CA
    certificates as they are closes nothing."""
    caplog.set_level(logging.INFO, logger="mqtt_ingest")
    config, ca_file = two_ca_sink_config(tmp_path, pki)
    ours = pki.device(f"ours-{uuid.uuid4().hex[:6]}")
    foreign = pki.foreign_device(f"foreign-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(config)) as sink:
        clients = {
            device.device_id: await connected(sink.port, device, pki) for device in (ours, foreign)
        }
        sink.reload(loaded(config))  # the same CA certificates: nobody is judged anew
        for device in (ours, foreign):
            await publishes(clients[device.device_id], device)
        ca_bundle(ca_file, pki.ca_cert)
        sink.reload(loaded(config))
        assert await clients[foreign.device_id].closed_within(5), "untrusted device kept on"
        await until(lambda: sink.metrics.get("connections_closed", "untrusted") == 1)
        [line] = [m for m in closings(caplog) if foreign.device_id in m]
        assert "certificate chain not trusted by the CA file now" in line
        await publishes(clients[ours.device_id], ours, packet_id=2)
        assert not await connects(sink.port, foreign, pki)  # as a new handshake
        # Replaced: the other CA instead of ours.
        ca_bundle(ca_file, pki.other_ca.cert_path)
        sink.reload(loaded(config))
        assert await clients[ours.device_id].closed_within(5), "untrusted device kept on"
        await until(lambda: sink.metrics.get("connections_closed", "untrusted") == 2)


async def test_a_ca_added_keeps_the_devices_of_an_ed25519_ca_connected(
    tmp_path: Path, pki: Pki
) -> None:
    """OpenSSL takes an Ed25519 CA (``bridge-certs init-ca --key-type ed25519``); the check of
    open connections at a CA file change used cryptography's path validation, which forbids
    Ed25519 keys, so adding a CA (a rotation) closed every device of that CA as untrusted."""
    ed_ca = CertificateAuthority.create(
        tmp_path / "edca", common_name="Ed CA", key_type=KeyType.ED25519
    )
    device = issued_creds(ed_ca, f"ed-{uuid.uuid4().hex[:6]}")
    ca_file = ca_bundle(tmp_path / "ca.pem", ed_ca.cert_path)
    config = write_sink_config(tmp_path, pki)
    config.write_text(config.read_text().replace(str(pki.ca_cert), str(ca_file)))
    async with Sink(loaded(config)) as sink:
        client = await connected(sink.port, device, pki)
        await publishes(client, device)
        ca_bundle(ca_file, ed_ca.cert_path, pki.other_ca.cert_path)  # a CA added, none removed
        sink.reload(loaded(config))
        assert not await client.closed_within(1), "a device of a CA still in the file closed"
        await publishes(client, device, packet_id=2)
        ca_bundle(ca_file, pki.other_ca.cert_path)  # and now removed
        sink.reload(loaded(config))
        assert await client.closed_within(5), "a device of a CA taken out kept on"
        await until(lambda: sink.metrics.get("connections_closed", "untrusted") == 1)


def issued_creds(ca: CertificateAuthority, device_id: str, **issue: Any) -> DeviceCreds:
    issued = ca.issue_device(device_id, **issue)
    return DeviceCreds(device_id, issued.cert_path, issued.key_path, issued.serial)


def der(path: Path) -> bytes:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate.public_bytes(serialization.Encoding.DER)


def trust_check(*authorities: Path) -> Callable[[bytes, tuple[bytes, ...]], str | None]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for authority in authorities:
        context.load_verify_locations(cafile=str(authority))
    return TrustStore(context).verifier()


def test_the_trust_store_takes_the_cas_openssl_takes_and_only_their_own_devices(
    tmp_path: Path,
) -> None:
    """A connection stays anchored if its chain's top is issued by a CA of the file, whatever
    the key types (cryptography's path validation refused Ed25519 CAs, version 1 roots); a CA
    of the same name with another key does not anchor it."""
    for ca_type in (KeyType.ED25519, KeyType.RSA_2048, KeyType.EC_P256):
        ca = CertificateAuthority.create(tmp_path / ca_type.value, key_type=ca_type)
        impostor = CertificateAuthority.create(tmp_path / f"{ca_type.value}-new", key_type=ca_type)
        check, other = trust_check(ca.cert_path), trust_check(impostor.cert_path)
        for device_type in KeyType:
            issued = ca.issue_device(f"d-{ca_type.value}-{device_type.value}", key_type=device_type)
            leaf = der(issued.cert_path)
            assert check(leaf, ()) is None, (ca_type, device_type)
            assert other(leaf, ()) is not None, (ca_type, device_type)
        # The top of the chain, not the leaf, is judged; and a CA of the file is its own anchor.
        device = der(ca.issue_device("d-top").cert_path)
        assert check(der(impostor.cert_path), (der(ca.cert_path),)) is None
        assert check(device, (der(impostor.cert_path),)) is not None

    # A version 1 root, as ``openssl x509 -req -signkey`` makes it: OpenSSL takes it.
    def run(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)

    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "v1.key")
    run("openssl", "req", "-new", "-key", "v1.key", "-subj", "/CN=v1ca", "-out", "v1.csr")
    run("openssl", "x509", "-req", "-in", "v1.csr", "-signkey", "v1.key", "-out", "v1.pem",
        "-days", "10")  # fmt: skip
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "d.key")
    run("openssl", "req", "-new", "-key", "d.key", "-subj", "/CN=dev-v1", "-out", "d.csr")
    (tmp_path / "ext").write_text("basicConstraints=CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", "d.csr", "-CA", "v1.pem", "-CAkey", "v1.key",
        "-CAcreateserial", "-out", "d.pem", "-days", "5", "-extfile", "ext")  # fmt: skip
    run("openssl", "verify", "-CAfile", "v1.pem", "d.pem")
    assert trust_check(tmp_path / "v1.pem")(der(tmp_path / "d.pem"), ()) is None


async def test_a_handshake_done_before_a_ca_file_change_is_closed_before_its_connect(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake verifies the chain with the CA certificates of its moment, and CONNECT
    checks only the CRL again: a device of a CA taken out by a reload, its handshake done
    before and its CONNECT after, got in and stayed. Connections not yet past CONNECT are
    closed at such a reload (they come back with a new handshake)."""
    caplog.set_level(logging.INFO, logger="mqtt_ingest")
    config, ca_file = two_ca_sink_config(tmp_path, pki)
    foreign = pki.foreign_device(f"foreign-{uuid.uuid4().hex[:6]}")
    ours = pki.device(f"ours-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(config)) as sink:
        waiting = [
            await RawClient.open(sink.port, ssl_context=pki.client_context(device))
            for device in (foreign, ours)
        ]
        sink.reload(loaded(config))  # the same CA certificates: nobody is closed
        assert not await waiting[0].closed_within(0.5)
        ca_bundle(ca_file, pki.ca_cert)  # the foreign CA taken out
        sink.reload(loaded(config))
        for client in waiting:
            assert await client.closed_within(5), "connection not past CONNECT kept on"
        await until(lambda: sink.metrics.get("connections_closed", "ca_changed") == 2)
        assert any(
            "closing 2 connection(s) not yet past CONNECT" in r.getMessage() for r in caplog.records
        )
        assert not await connects(sink.port, foreign, pki)
        await (await connected(sink.port, ours, pki)).aclose()


async def test_a_device_revoked_between_its_handshake_and_its_connect_is_refused(
    tmp_path: Path, pki: Pki
) -> None:
    """The handshake checked the certificate against the CRL of its moment, and the reload's
    revalidation sees only authenticated connections: a CRL that arrives in between is checked
    at CONNECT (the device used to get in and stay until its token expired)."""
    crl = own_crl(tmp_path, pki)
    victim = pki.device(f"between-{uuid.uuid4().hex[:6]}")
    async with Sink(loaded(crl_config(tmp_path, pki, crl, "0.2s"))) as sink:
        client = await RawClient.open(sink.port, ssl_context=pki.client_context(victim))
        pki.ca.revoke(victim.device_id)
        pki.ca.write_crl(crl)
        await until(lambda: sink.tls.reloads == 1)
        token = device_token(victim).encode()
        name = victim.device_id
        await client.send(connect_packet(name, username=name, password=token))
        connack = await client.read()
        await client.aclose()
        assert connack is not None
        assert connack.body == b"\x00\x05"  # not authorized
        refused = sink.metrics.get("connections_refused", "certificate revoked")
    assert refused == 1


def two_ca_sink_config(tmp_path: Path, pki: Pki) -> tuple[Path, Path]:
    """A sink configuration trusting our CA and the other one, from one CA file (returned too,
    for a reload to change)."""
    ca_file = ca_bundle(tmp_path / "ca.pem", pki.ca_cert, pki.other_ca.cert_path)
    config = write_sink_config(tmp_path, pki)
    config.write_text(config.read_text().replace(str(pki.ca_cert), str(ca_file)))
    return config, ca_file
