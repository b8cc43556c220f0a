"""Refused certificates on either side (RELIABILITY F12, F13): a revoked, foreign or expired
client certificate is refused, said once and retried slowly while the agent keeps buffering; a
bad server certificate is refused with no fallback; the agent's ``[uplink.tls] crl`` refuses a
sink whose certificate it lists, refuses (saying why) on an expired or foreign CRL, and is read
again when it changes. The sink is real (in this process)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from edge_agent import Agent, load_config
from edge_agent.buffer import inspect
from edge_agent.link import LinkState
from edge_agent.uplink import CRL_CHECK_INTERVAL
from tests.harness.mosquitto import free_port
from tests.harness.pki import Pki
from tests.harness.report import figures, until
from tests.harness.sink import running_sink as sink
from tests.harness.uplink import configure, link, new_device, stored_payloads

pytestmark = [pytest.mark.fault, pytest.mark.integration]


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
