"""Open connections judged again at a reload, as a new CONNECT would be: a device revoked by a
new CRL or put on the deny list, one whose token the new [auth] settings refuse (or whose end
moves with the leeway), one whose certificate chain the CA file no longer anchors (the trust
check takes the CAs OpenSSL takes) is disconnected at the reload, not at its next CONNECT; a
reload that refuses nobody closes nothing; a connection between its handshake and its CONNECT
is closed or refused."""

from __future__ import annotations

import logging
import ssl
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs import CertificateAuthority, KeyType
from cloud_sink.config import parse_config
from cloud_sink.service import Sink
from cloud_sink.tls import TrustStore
from tests.harness.clock import SkewedClock
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.rawmqtt import RawClient, connect_packet, publish_packet
from tests.harness.sink import device_token, write_sink_config
from tests.harness.sink_tls import connected, connects, crl_config, loaded, own_crl, until


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
