"""The sink's TLS listener: it offers no TLS session resumption (a resumed handshake would not
verify the certificate again, so a device revoked by a new CRL since could get back in), and its
TLS read buffer is the configured size instead of asyncio's 256 KiB per connection."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import sqlite3
import ssl
import uuid
from pathlib import Path

import aiomqtt
import pytest

from cloud_sink.config import ConfigError, parse_config
from cloud_sink.service import Sink
from tests.harness.pki import Pki
from tests.harness.rawmqtt import connect_packet, tls_connect
from tests.harness.sink import device_token, write_sink_config
from tests.harness.sink_tls import crl_config, loaded, own_crl, until


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
