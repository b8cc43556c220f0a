"""A new CRL takes effect in a running sink without a restart (SPEC §6), on SIGHUP and when
the file changes, also one replaced as the sink starts; a CRL that cannot be trusted is refused
and the previous one kept, one that time can make usable (not valid yet, the server key being
replaced) is tried again at every look; a CRL about to expire is announced, and once it has
expired the sink is not ready."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import signal
import ssl
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import crls
from cloud_sink.service import Sink
from cloud_sink.tls import TlsReloader, certificate_key
from mqtt_ingest.crl import load_crl
from tests.harness.pki import Pki
from tests.harness.process import ProcessFactory
from tests.harness.sink import CLOUD_SINK
from tests.harness.sink_tls import connected, connects, crl_config, loaded, own_crl, until


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
