"""The uplink against a real sink (in process, sqlite core queue) over mutual TLS with JWTs."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloud_sink.backends import read_messages
from edge_agent import Agent, load_config
from edge_agent import uplink as uplink_module
from edge_agent.buffer import inspect, read_events
from edge_agent.link import LinkState, read_link_status, recording_socket_class
from edge_agent.status import link_text, read_link
from edge_agent.systemd import status as systemd_status
from edge_agent.token import TokenFile, TokenUnavailable
from mqtt_ingest.backoff import Backoff
from mqtt_ingest.clock import SystemClock
from tests.harness.agent_cli import acli
from tests.harness.mosquitto import free_port
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.report import figures, until
from tests.harness.sink import AUD
from tests.harness.sink import running_sink as sink
from tests.harness.uplink import (
    agent_config,
    issue_token,
    issuer_key,
    issuer_signed_auth,
    new_device,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", ["batch-v2", "batch-v1", "raw"])
async def test_events_reach_the_core_queue_once_in_order(
    tmp_path: Path, pki: Pki, fmt: str
) -> None:
    device = new_device(pki, "up")
    async with sink(tmp_path, pki) as server:
        path = agent_config(tmp_path, pki, device, server.port, extra=f'format = "{fmt}"')
        config = load_config(path)
        async with Agent(config) as agent:
            ids = []
            for i in range(300):
                topic = ("alarms/door", "bulk/vib", "sensors/t1")[i % 3]
                ids.append(await agent.publish(topic, f"{i}".encode()))
            await until(lambda: inspect(config.agent.data_dir).events == 0)
            status = read_link_status(config.agent.data_dir)
            assert status is not None
            assert status.state is LinkState.ONLINE
            assert agent.uplink is not None
            assert agent.uplink.status.delivered == 300
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    prefix = f"devices/{device.device_id}/"
    if fmt != "raw":  # the events' own ids (raw: the sink's)
        assert sorted(m.event_id for m in stored) == sorted(ids)
    assert len(stored) == 300
    for topic, qos in (("alarms/door", 2), ("bulk/vib", 0), ("sensors/t1", 1)):
        mine = [m for m in stored if m.topic == prefix + topic]
        assert len(mine) == 100
        assert {m.qos for m in mine} == {qos}
        payloads = [int(m.payload) for m in mine]
        assert payloads == sorted(payloads), f"{topic} out of order"
    status = read_link_status(config.agent.data_dir)
    assert status is not None
    assert status.state is LinkState.STOPPED


async def test_status_shows_the_whole_burst_delivered_once_it_ends(
    tmp_path: Path, pki: Pki
) -> None:
    """link.json was written at most every 2 s while acks came, and not after the last: after
    a burst `status` showed a delivered count of its middle until the next one."""
    device = new_device(pki, "stale")
    async with sink(tmp_path, pki) as server:
        config = load_config(agent_config(tmp_path, pki, device, server.port))
        async with Agent(config) as agent:
            await until(lambda: read_link_status(config.agent.data_dir) is not None)
            for i in range(50):
                await agent.publish("sensors/t", b"%d" % i)
            await until(lambda: inspect(config.agent.data_dir).events == 0)

            def shown() -> int | None:
                status = read_link_status(config.agent.data_dir)
                return None if status is None else status.delivered

            await until(lambda: shown() == 50, timeout=6)
            assert agent.uplink is not None
            assert agent.uplink.status.state is LinkState.ONLINE  # no state change wrote it


async def test_backlog_built_offline_drains_when_the_sink_appears(tmp_path: Path, pki: Pki) -> None:
    device = new_device(pki, "off")
    port = free_port()
    config = load_config(agent_config(tmp_path, pki, device, port))
    async with Agent(config) as agent:
        for i in range(500):
            await agent.publish(f"sensors/s{i % 5}", f"{i}".encode())
        await until(lambda: (s := read_link_status(config.agent.data_dir)) is not None
                    and s.state is LinkState.BACKOFF)  # fmt: skip
        assert inspect(config.agent.data_dir).events == 500
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0)
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    assert len(stored) == 500
    assert len({m.event_id for m in stored}) == 500


async def test_high_priority_events_overtake_the_backlog(tmp_path: Path, pki: Pki) -> None:
    device = new_device(pki, "prio")
    port = free_port()
    config = load_config(
        agent_config(tmp_path, pki, device, port, extra='format = "raw"\nwindow = 1')
    )
    async with Agent(config) as agent:
        for i in range(200):
            await agent.publish("sensors/t", f"{i}".encode())
        await agent.publish("alarms/fire", b"!")
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0)
    stored = [m for _, m in read_messages(tmp_path / "core.db")]
    assert stored[0].topic.endswith("alarms/fire")


async def test_nothing_is_lost_when_the_link_goes_away(tmp_path: Path, pki: Pki) -> None:
    """The sink stops and comes back on the same port while events keep arriving."""
    device = new_device(pki, "flap")
    port = free_port()
    config = load_config(agent_config(tmp_path, pki, device, port))
    published = 0
    async with Agent(config) as agent:
        for _ in range(3):
            async with sink(tmp_path, pki, port=port):
                for _ in range(200):
                    await agent.publish("sensors/t", f"{published}".encode())
                    published += 1
                    await asyncio.sleep(0.001)
            for _ in range(100):
                await agent.publish("sensors/t", f"{published}".encode())
                published += 1
        async with sink(tmp_path, pki, port=port):
            await until(lambda: inspect(config.agent.data_dir).events == 0)
    stored = [int(m.payload) for _, m in read_messages(tmp_path / "core.db")]
    figures("link flaps", published=published, stored=len(stored), unique=len(set(stored)))
    assert sorted(set(stored)) == list(range(published))
    assert len(stored) == published  # the sqlite core queue dedupes resends by event id
    assert not list(read_events(config.agent.data_dir))


async def test_token_file_mode_reads_the_file_again_when_it_changes(
    tmp_path: Path, pki: Pki
) -> None:
    """Issuer-signed tokens from `cloud-sink issue-token`: an expired file blocks the uplink
    (refused, nothing sent), a fresh one written to the same path gets it going again."""
    device = new_device(pki, "tokfile")
    private, public = issuer_key(tmp_path)
    token_path = tmp_path / "device.jwt"
    token_path.write_text(issue_token(device, private, ttl=-60))  # already expired

    async with sink(tmp_path, pki, extra_auth=issuer_signed_auth(public)) as server:
        path = agent_config(
            tmp_path, pki, device, server.port,
            token=f'mode = "token-file"\nfile = "{token_path}"',
        )  # fmt: skip
        config = load_config(path)
        async with Agent(config) as agent:
            await agent.publish("sensors/t1", b"1")
            await until(lambda: (s := read_link_status(config.agent.data_dir)) is not None
                        and s.state is LinkState.REFUSED)  # fmt: skip
            assert agent.uplink is not None
            assert "expired" in agent.uplink.status.last_error
            status = await acli(path, "status")
            assert "token: WARNING" in status.stdout
            # Less left than renew_before (5 min): renewing early cannot get a later token
            # until the file changes. It used to reconnect every second until exp.
            token_path.write_text(issue_token(device, private, ttl=200))
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            assert agent.uplink.status.token_expires_at is not None
            connections = agent.uplink.status.connections
            await asyncio.sleep(3)
            assert agent.uplink.status.connections == connections
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"1"]


class _FullBackoff(Backoff):
    """The back-off's ceiling every time, no jitter: a refused back-off of a known length."""

    def next_delay(self, rng: Callable[[], float] = random.random) -> float:
        delay = self.ceiling(self.failures)
        self.failures += 1
        return delay


async def test_a_token_file_fixed_during_a_refused_backoff_is_used_at_once(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/operations.md: "the agent reads the file again whenever it changes". With an
    expired token the link is refused and backs off slowly (up to 15 min by default); a fresh
    token written meanwhile waited for the back-off to end: only the CRL file was watched. Now
    the token file is watched too, and its change ends the back-off."""
    monkeypatch.setattr(uplink_module, "Backoff", _FullBackoff)
    monkeypatch.setattr(uplink_module, "CRL_CHECK_INTERVAL", 0.2)
    device = new_device(pki, "tokwait")
    private, public = issuer_key(tmp_path)
    token_path = tmp_path / "device.jwt"
    token_path.write_text(issue_token(device, private, ttl=-60))  # expired

    async with sink(tmp_path, pki, extra_auth=issuer_signed_auth(public)) as server:
        path = agent_config(
            tmp_path, pki, device, server.port,
            token=f'mode = "token-file"\nfile = "{token_path}"',
        )  # fmt: skip
        path.write_text(
            path.read_text()
            .replace('refused_backoff_initial = "1s"', 'refused_backoff_initial = "10m"')
            .replace('refused_backoff_max = "2s"', 'refused_backoff_max = "10m"')
        )
        config = load_config(path)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await agent.publish("sensors/t1", b"1")
            await until(lambda: status.retry_at is not None, timeout=30)
            retry_at = status.retry_at
            assert retry_at is not None
            assert status.state is LinkState.REFUSED
            token_path.write_text(issue_token(device, private, ttl=600))
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=60)
            delivered_at = time.time()
            failures = status.failures
    figures("a fresh token file during a refused back-off", failures=failures,
            backoff_left_s=round(retry_at - delivered_at))  # fmt: skip
    assert delivered_at < retry_at, "the fresh token waited for the back-off to end"
    assert failures == 1
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"1"]


def unsigned_token(exp: str) -> str:
    """A JWT whose claims are ``{"sub": "dev-1", "exp": <exp as written>}``: JSON text, so
    that values Python's json reads as inf or nan can be written."""
    encode = jwt.utils.base64url_encode
    header = encode(b'{"alg":"ES256","typ":"JWT"}').decode()
    claims = encode(b'{"sub":"dev-1","exp":%s}' % exp.encode()).decode()
    return f"{header}.{claims}.{encode(bytes(64)).decode()}"


@pytest.mark.parametrize(
    ("exp", "problem"),
    [
        ("1e400", "exp out of range (inf)"),
        ("NaN", "exp out of range (nan)"),
        ("-1", "exp out of range (-1)"),
        ("1e20", "exp out of range (1e+20)"),
        ("true", "non-numeric exp"),
        ('"1700000000"', "non-numeric exp"),
    ],
)
def test_a_token_file_with_an_exp_no_date_can_show_is_unusable(
    tmp_path: Path, exp: str, problem: str
) -> None:
    """JSON's 1e400 and NaN read as inf and nan: `status` raised OverflowError on them, and so
    did the uplink's log line after every CONNECT (reconnecting for ever); nan never expired."""
    path = tmp_path / "device.jwt"
    path.write_text(unsigned_token(exp))
    with pytest.raises(TokenUnavailable, match=re.escape(problem)):
        TokenFile(path, SystemClock()).current()
    path.write_text(unsigned_token("253402300799"))  # the last second of year 9999
    assert TokenFile(path, SystemClock()).current().expires_at == 253402300799.0


@pytest.mark.parametrize(
    ("cut", "problem"),
    [
        (lambda t: t[: t.rindex(".") + 1], "has no signature (the file cut short?)"),
        (lambda t: t[:-6], "has a signature of 60 bytes, wrong for ES256 (the file cut short?)"),
        (lambda t: t[: t.rindex(".")], "does not hold a JWT"),
    ],
    ids=["no signature", "signature cut short", "no signature segment"],
)
def test_a_token_file_cut_short_is_not_a_token(
    tmp_path: Path, pki: Pki, cut: Callable[[str], str], problem: str
) -> None:
    """A token file cut short in its signature (a copy interrupted, a full disk, a writer seen
    half-way) parsed: ``header.payload.`` was taken as a fresh token, replacing a valid one at
    renewal, and the sink refused it (bad signature). Refused as a broken file now."""
    device = new_device(pki, "trunc")
    private, _ = issuer_key(tmp_path)
    whole = issue_token(device, private, ttl=600)
    path = tmp_path / "device.jwt"
    path.write_text(cut(whole))
    with pytest.raises(TokenUnavailable, match=re.escape(problem)):
        TokenFile(path, SystemClock(), device_id=device.device_id).current()
    path.write_text(whole)
    assert TokenFile(path, SystemClock(), device_id=device.device_id).current().value == whole


@pytest.mark.parametrize("bits", [2048, 2304, 3000])
def test_an_rs256_token_file_of_any_key_size_is_a_token(tmp_path: Path, bits: int) -> None:
    """Found by review: the cut-short check took RS256 signatures for RSA keys in steps of 512
    bits only, so every token of a 2304 or 3000-bit issuer key was "cut short" (the sink takes
    them): the agent kept the old token until it expired, then had none."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    claims = {"sub": "dev-1", "aud": AUD, "iat": int(time.time()), "exp": int(time.time()) + 600}
    token = jwt.encode(claims, key, algorithm="RS256")
    path = tmp_path / "device.jwt"
    path.write_text(token)
    assert TokenFile(path, SystemClock(), device_id="dev-1").current().value == token


def test_a_token_file_for_another_device_or_audience_keeps_the_token_read_before(
    tmp_path: Path, pki: Pki
) -> None:
    """The wrong file copied to the gateway (another device's token, or one for another sink):
    the sink refuses it, so it must not replace the token still in use ("a broken new file keeps
    the previous token in use while that one is valid")."""
    device, other = new_device(pki, "tokmine"), new_device(pki, "tokother")
    private, _ = issuer_key(tmp_path)
    path = tmp_path / "device.jwt"
    mine = issue_token(device, private, ttl=300)
    path.write_text(mine)
    tokens = TokenFile(path, SystemClock(), device_id=device.device_id, audience=AUD)
    assert tokens.current().value == mine
    path.write_text(issue_token(other, private, ttl=600))
    assert tokens.current().value == mine
    with pytest.raises(TokenUnavailable, match=f"is for '{other.device_id}', not this device"):
        TokenFile(path, SystemClock(), device_id=device.device_id).current()
    elsewhere = TokenFile(path, SystemClock(), device_id=other.device_id, audience="elsewhere")
    with pytest.raises(TokenUnavailable, match=re.escape("audience 'sink.test', not 'elsewhere'")):
        elsewhere.current()
    assert TokenFile(path, SystemClock(), device_id=other.device_id).current().value is not None


async def test_a_token_file_for_another_device_does_not_replace_the_valid_one(
    tmp_path: Path, pki: Pki
) -> None:
    """At renewal, a token file holding another device's token was taken as the fresh token:
    the agent dropped its working connection and was refused, its own token minutes from its
    end. Now the connection is kept on the token it has, and events keep flowing."""
    device, other = new_device(pki, "tokmine"), new_device(pki, "tokother")
    private, public = issuer_key(tmp_path)
    token_path = tmp_path / "device.jwt"
    token_path.write_text(issue_token(device, private, ttl=60))

    async with sink(tmp_path, pki, extra_auth=issuer_signed_auth(public)) as server:
        path = agent_config(
            tmp_path, pki, device, server.port,
            token=f'mode = "token-file"\nfile = "{token_path}"\nrenew_before = "57s"',
        )  # fmt: skip
        config = load_config(path)
        async with Agent(config) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await until(lambda: status.connections == 1, timeout=30)
            token_path.write_text(issue_token(other, private, ttl=120))  # the wrong device's
            await asyncio.sleep(5)  # past the renewal, due at connect + 3 s
            await agent.publish("sensors/t1", b"after")
            await until(lambda: inspect(config.agent.data_dir).events == 0, timeout=30)
            state, connections, failures = status.state, status.connections, status.failures
    figures("token file for another device", state=str(state), connections=connections)
    assert (state, connections, failures) == (LinkState.ONLINE, 1, 0)
    assert [m.payload for _, m in read_messages(tmp_path / "core.db")] == [b"after"]


def issued_between(device: DeviceCreds, issuer: Path, iat: int, exp: int) -> str:
    """An issuer-signed token as `cloud-sink issue-token` makes it, issued at ``iat``."""
    key = serialization.load_pem_private_key(issuer.read_bytes(), password=None)
    claims = {"sub": device.device_id, "aud": AUD, "iss": "https://issuer.test", "iat": iat,
              "exp": exp}  # fmt: skip
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("lifetime", "left", "warned"),
    [(3600, 3600, False), (3600, 1200, False), (3600, 600, True), (86400, 7200, False),
     (86400, 3000, True), (600, 400, False), (600, 200, True)],
)  # fmt: skip
def test_status_warns_about_a_file_token_by_its_lifetime(
    tmp_path: Path, pki: Pki, lifetime: int, left: int, warned: bool
) -> None:
    """`cloud-sink issue-token` defaults to a 1 h token (the sink's default max_lifetime): with a
    flat hour, status warned about every token so issued, from the moment it was. Now it warns
    once a quarter of the lifetime is left (at most an hour, at least renew_before, 5 min)."""
    device = new_device(pki, "tokwarn")
    private, _ = issuer_key(tmp_path)
    token_path = tmp_path / "device.jwt"
    now = int(time.time())
    token_path.write_text(issued_between(device, private, now + left - lifetime, now + left))
    path = agent_config(
        tmp_path, pki, device, 1, token=f'mode = "token-file"\nfile = "{token_path}"'
    )
    [line] = [x for x in link_text(read_link(load_config(path))).splitlines() if "token" in x]
    assert line.startswith("token: WARNING expires in") is warned, line


async def test_status_and_token_commands_show_the_uplink(tmp_path: Path, pki: Pki) -> None:
    device = new_device(pki, "status")
    async with sink(tmp_path, pki) as server:
        path = agent_config(tmp_path, pki, device, server.port)
        config = load_config(path)
        async with Agent(config) as agent:
            await agent.publish("sensors/t1", b"1")
            await until(lambda: inspect(config.agent.data_dir).events == 0)
            text = await acli(path, "status")
            as_json = await acli(path, "status", "--json")
            token = await acli(path, "token")
    assert f"uplink: online (localhost:{server.port})" in text.stdout, text.stdout
    assert "certificate: expires in" in text.stdout
    uplink = json.loads(as_json.stdout)["uplink"]
    assert uplink["link"]["state"] == "online"
    assert uplink["agent_pid"] is not None
    claims = jwt.decode(token.stdout.strip(), options={"verify_signature": False})
    assert (claims["sub"], claims["aud"]) == (device.device_id, AUD)
    stopped = await acli(path, "status")
    assert "the agent is not running; last state stopped" in stopped.stdout


async def test_status_shows_the_certificate_in_use_and_the_token_time_left_now(
    tmp_path: Path, pki: Pki
) -> None:
    """Found by review: `status` read the certificate file, not the certificate in use: after a
    rotation the agent refused (a wrong key), the valid file on disk hid the expiry warning of
    the one in use. And the online line's "token expires in Ns" was written at CONNACK and
    stayed so, in `status` and systemd's status line, for the token's whole life."""
    device_id = f"shown-{uuid.uuid4().hex[:6]}"
    creds = tmp_path / "creds"
    short = pki.ca.issue_device(
        device_id, days=10, cert_path=creds / "d.pem", key_path=creds / "d.key"
    )
    device = DeviceCreds(device_id, short.cert_path, short.key_path, short.serial)
    token = f'audience = "{AUD}"\nlifetime = "60s"\nrenew_before = "5s"'
    async with sink(tmp_path, pki) as server:
        path = agent_config(tmp_path, pki, device, server.port, token=token)
        async with Agent(load_config(path)) as agent:
            assert agent.uplink is not None
            status = agent.uplink.status
            await until(lambda: status.connections == 1)
            longer = pki.ca.issue_device(
                device_id, days=365, cert_path=tmp_path / "l.pem", key_path=tmp_path / "l.key"
            )
            device.cert.write_bytes(longer.cert_path.read_bytes())  # and the old key: refused
            with pytest.raises(ValueError, match="unusable TLS files"):
                agent.reload(load_config(path))
            await asyncio.sleep(2.5)
            shown = (await acli(path, "status")).stdout
            line = systemd_status(agent).text
    assert "certificate: WARNING expires in 9d" in shown, shown
    assert "certificate file (not loaded): expires in 364d" in shown, shown
    for text in (shown, line):
        left = int(re.findall(r"token expires in (\d+)s", text)[0])
        assert left <= 58, text


async def test_status_shows_the_certificate_in_use_from_the_first_attempt(
    tmp_path: Path, pki: Pki
) -> None:
    """Found by review: link.json got the certificate in use only at the next state change
    after the connection attempt began: after a restart with a new certificate, `status` showed
    the last run's (and the new file as "not loaded") for up to connect_timeout, here while a
    server that never answers the handshake holds the attempt."""
    device = new_device(pki, "first-attempt")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the agent gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        path = agent_config(tmp_path, pki, device, port, extra='connect_timeout = "30s"')
        config = load_config(path)
        async with Agent(config):
            # (Written before the handshake; it used to be when the attempt failed, 10 s on.)
            await until(lambda: read_link_status(config.agent.data_dir) is not None, timeout=5)
            state = read_link_status(config.agent.data_dir)
    assert state is not None
    expected = x509.load_pem_x509_certificate(device.cert.read_bytes()).not_valid_after_utc
    assert (state.state, state.certificate_not_after) == (
        LinkState.CONNECTING,
        expected.timestamp(),
    )


def test_a_socket_reset_before_the_tls_handshake_is_closed_with_the_attempt() -> None:
    """A reset before the handshake fails the TLS wrap itself (Python 3.11 checks for data
    sent before the handshake); the new socket was left to the garbage collector, and its
    ResourceWarning failed `test_network_cuts_lose_nothing[reset]` now and then. The attempt's
    list now holds it, for the uplink to close."""
    sockets: list[ssl.SSLSocket] = []
    context = ssl.create_default_context()
    context.sslsocket_class = recording_socket_class([], sockets)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        peer, _ = server.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset
        time.sleep(0.1)
        with pytest.raises(ConnectionResetError):
            context.wrap_socket(client, server_hostname="localhost", do_handshake_on_connect=False)
    assert len(sockets) == 1
    sockets[0].close()


async def test_link_json_follows_each_refusal_before_the_connect(tmp_path: Path, pki: Pki) -> None:
    """Found by review of 526f433: the state goes to connecting only once the TLS material and
    the token are loaded. A refusal while loading them (a token file that expired, a
    certificate past its date, a CRL past its next update) then found the state refused
    with the same detail, unchanged: link.json was never written again, its failures count and
    retry_at stayed those of the first attempt (a retry time long past)."""
    device = new_device(pki, "refused-early")
    private, _ = issuer_key(tmp_path)
    token_path = tmp_path / "device.jwt"
    token_path.write_text(issue_token(device, private, ttl=-60))  # expired: TokenUnavailable
    path = agent_config(
        tmp_path, pki, device, free_port(),
        token=f'mode = "token-file"\nfile = "{token_path}"',
    )  # fmt: skip
    config = load_config(path)
    async with Agent(config) as agent:
        assert agent.uplink is not None
        status = agent.uplink.status
        await until(lambda: status.failures >= 3, timeout=30)
        await until(lambda: status.retry_at is not None, timeout=30)
        written = read_link_status(config.agent.data_dir)
        in_memory = (status.state, status.failures, status.retry_at)
    assert written is not None
    assert (written.state, written.failures, written.retry_at) == in_memory
