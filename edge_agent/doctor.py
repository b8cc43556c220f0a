"""``edge-agent doctor``: check what the agent needs, one line per check, with the fix in words.

The checks run in order and later ones are skipped when an earlier one they need failed (no TCP
check without a resolvable name, no CONNECT without a TLS session). Nothing is written: the
buffer is only read, the one CONNECT publishes nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from cryptography import x509

from edge_agent.buffer import DB_NAME, BufferError, agent_pid, inspect
from edge_agent.clocksync import clock_sync
from edge_agent.config import AgentConfig, ListenerTls, UplinkConfig
from edge_agent.local import ListenerTlsError, listener_tls, openssl_reads_certificates
from edge_agent.tls import CRL_REFUSED, chains_to, client_context, key_matches
from edge_agent.token import TokenUnavailable, load_private_key, token_source
from mqtt_ingest.clock import SystemClock
from mqtt_ingest.crl import TlsError, check_crl
from mqtt_ingest.disk import free_bytes, megabytes
from mqtt_ingest.identity import certificate_identities

__all__ = ["Check", "run_checks"]

CERTIFICATE_WARNING_DAYS = 30
CRL_WARNING = dt.timedelta(days=1)
X509_V_ERR_UNABLE_TO_GET_CRL = 3
X509_V_ERR_CERT_REVOKED = 23
NETWORK_TIMEOUT = 10.0
BAD_CREDENTIALS, NOT_AUTHORIZED = 4, 5  # CONNACK return codes (MQTT 3.1.1)
_V5_CODES = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: BAD_CREDENTIALS, 0x87: NOT_AUTHORIZED}
"""paho reports a 3.1.1 CONNACK's code as the MQTT 5 reason code it maps it to."""
_CREDENTIALS_FIX = (
    "check the gateway's clock (a token minted by a clock behind or ahead is refused), "
    "[uplink.token] (audience, mode) against the sink's [auth], that the device id is not on "
    "its deny list, and that the sink knows [uplink] format (a sink older than batch-v2 needs "
    'format = "batch-v1"); the sink\'s log says which'
)
CONNACK_FIXES = {
    1: "the server does not speak MQTT 3.1.1: check [uplink] host and port",
    2: (
        "the server refused the client id (our sink takes the device id from the certificate: "
        "[agent] device_id must be the one the certificate names)"
    ),
    3: (
        "the server cannot take events now (our sink: its core queue is down, or it is starting"
        " or stopping): nothing to change here; the sink's /readyz and log say why"
    ),
    BAD_CREDENTIALS: _CREDENTIALS_FIX,
    NOT_AUTHORIZED: _CREDENTIALS_FIX,
}
"""What to do about a CONNACK refusal, by its 3.1.1 return code."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok, but worth a look

    def line(self) -> str:
        mark = "FAIL" if not self.ok else ("WARN" if self.warning else "ok")
        text = f"{mark:<4} {self.name}: {self.detail}"
        if self.fix:
            text += f"\n     fix: {self.fix}"
        return text


class _Failed(Exception):
    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def _check(name: str, probe: Callable[[], str | tuple[str, bool]]) -> Check:
    try:
        result = probe()
    except _Failed as failed:
        return Check(name, False, failed.detail, failed.fix)
    except OSError as exc:  # a file that went away or changed kind between two checks
        where = f"{exc.filename}: " if exc.filename else ""
        return Check(
            name, False, f"{where}{exc.strerror or exc}", "check that path and its permissions"
        )
    detail, warning = result if isinstance(result, tuple) else (result, False)
    return Check(name, True, detail, warning=warning)


def run_checks(config: AgentConfig, path: Path) -> Iterator[Check]:
    """Every check in order; stops at the first failure a later check depends on."""
    yield Check("config", True, f"{path} is valid ({len(config.topics)} topic rules)")
    yield _check(
        "data directory", lambda: _data_dir(config.agent.data_dir, config.buffer.disk_reserve)
    )
    local_tls = config.listener.tls
    if config.listener.enabled and local_tls is not None:
        # `run` refuses to start without these (exit status 2); nothing later depends on them.
        yield _check("listener tls", lambda: _listener_tls(local_tls))
    uplink = config.uplink
    if uplink is None:
        yield Check("uplink", True, "not configured: the agent only buffers", warning=True)
        return
    files = _check("files", lambda: _files(uplink))
    yield files
    if not files.ok:
        return
    clock = _check("clock", lambda: _clock(uplink))
    yield clock
    chain = _check("certificate", lambda: _certificate(uplink))
    yield chain
    if uplink.tls.crl is not None:
        crl = _check("crl", lambda: _crl(uplink))
        yield crl
        chain = chain if crl.ok else crl
    identity = _check("identity", lambda: _identity(config.agent.device_id, uplink))
    yield identity
    chain = chain if identity.ok else identity
    key = _check("key", lambda: _key_matches(uplink))
    yield key
    token = _check("token", lambda: _token(config, uplink))
    yield token
    dns = _check("dns", lambda: _dns(uplink))
    yield dns
    if not dns.ok:
        return
    tcp = _check("tcp", lambda: _tcp(uplink))
    yield tcp
    if not tcp.ok:
        return
    handshake = _check("tls", lambda: _tls(uplink))
    yield handshake
    if not (handshake.ok and chain.ok and key.ok and token.ok and clock.ok):
        return
    running = agent_pid(config.agent.data_dir)
    if running is not None:
        # Same client id: the sink would close the running agent's connection (takeover), and
        # the agent would resend its in-flight window.
        yield Check(
            "connect",
            True,
            f"skipped: the agent (pid {running}) is running; `edge-agent status` shows its link",
            warning=True,
        )
        return
    yield _check("connect", lambda: asyncio.run(_connect(config, uplink)))


def _data_dir(directory: Path, reserve: int) -> str | tuple[str, bool]:
    if directory.exists() and not directory.is_dir():
        raise _Failed(
            f"{directory} is not a directory", "remove it or point data_dir at a directory"
        )
    if not directory.exists():
        parent = directory.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _Failed(
                f"{directory} does not exist and {parent} is not writable for uid {os.getuid()}",
                f"create {directory} owned by the agent's user (the systemd unit's StateDirectory "
                "does this)",
            )
        return f"{directory} does not exist yet; the agent will create it"
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _Failed(
            f"{directory} is not writable for uid {os.getuid()}",
            "chown the directory to the agent's user, or run doctor as that user",
        )
    free = free_bytes(directory)
    room = f"{megabytes(free)} free (disk_reserve {megabytes(reserve)})"
    if not (directory / DB_NAME).exists():
        detail = f"{directory} is writable, {room}; the agent will create its buffer there"
    else:
        try:
            stats = inspect(directory)
        except BufferError as exc:
            raise _Failed(f"the buffer cannot be read: {exc}", "see docs/buffer.md") from None
        detail = (
            f"{directory}: {stats.events} events buffered, {stats.dead_letters} dead letters, "
            f"{room}"
        )
    if free < reserve:
        return (
            f"{detail}; that is below the reserve: new events only reuse the room of "
            "delivered ones until that filesystem has more free space",
            True,
        )
    return detail


def _files(uplink: UplinkConfig) -> str | tuple[str, bool]:
    tls = uplink.tls
    paths = [("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)]
    if tls.crl is not None:
        paths.append(("crl", tls.crl))
    if uplink.token.mode == "token-file" and uplink.token.file is not None:
        paths.append(("token file", uplink.token.file))
    for what, path in paths:
        if not path.exists():
            raise _Failed(f"uplink {what} {path} does not exist", f"put the {what} file at {path}")
        if not path.is_file():
            raise _Failed(
                f"uplink {what} {path} is not a regular file", f"put the {what} file at {path}"
            )
        if not os.access(path, os.R_OK):
            raise _Failed(
                f"uplink {what} {path} is not readable for uid {os.getuid()}",
                f"make {path} readable by the agent's user (keys: 0640 root:edge-agent, or 0600)",
            )
    mode = stat.S_IMODE(tls.key.stat().st_mode)
    # 0640 root:<the agent's group> is the layout the README installs (the service can read its
    # key but not replace it); group write or any access for others is what exposes a key.
    if mode & 0o037:
        return (
            f"all present; but the key {tls.key} has mode {mode:o}: chmod 640 (root:edge-agent)"
            " or 600 (owned by the agent's user)",
            True,
        )
    return f"ca, certificate and key present and readable; key mode {mode:04o}"


def _listener_tls(tls: ListenerTls) -> str | tuple[str, bool]:
    """What `run` loads for ``[listener.tls]`` (the same function), then the certificate's
    expiry and the key's mode."""
    try:
        _, certificate = listener_tls(tls)
    except ListenerTlsError as exc:
        raise _Failed(
            str(exc),
            "put the listener's server certificate and its key, and the CA of the local clients'"
            " certificates, at those paths, readable by the agent's user; the agent does not"
            " start without them",
        ) from None
    left = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left.total_seconds() <= 0:
        raise _Failed(
            f"cert {tls.cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d}: local"
            " clients refuse it",
            "issue a new one (bridge-certs server ...), install it, systemctl restart edge-agent",
        )
    detail = f"ca, cert and key usable, the key matches; the cert expires in {left.days} days"
    mode = stat.S_IMODE(tls.key.stat().st_mode)
    if mode & 0o037:
        return f"{detail}; but the key {tls.key} has mode {mode:o}: chmod 640 or 600", True
    if left.days < CERTIFICATE_WARNING_DAYS:
        return detail + ": renew it soon", True
    return detail


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise _Failed(
            f"{path} is not a PEM certificate: {exc}", "use bridge-certs output"
        ) from None


def _clock(uplink: UplinkConfig) -> str | tuple[str, bool]:
    """Not before the certificate (which fails), and synchronised by NTP (a warning otherwise:
    the sink refuses a device-signed token minted further than its leeway, 30 s by default,
    from its own clock, and any token once the clock is past ``exp``)."""
    now = dt.datetime.now(dt.UTC)
    certificate = _load_certificate(uplink.tls.cert)
    sync = clock_sync()
    if now < certificate.not_valid_before_utc:
        raise _Failed(
            f"the system clock ({now:%Y-%m-%d %H:%M}Z) is before the certificate was issued "
            f"({certificate.not_valid_before_utc:%Y-%m-%d %H:%M}Z); {sync.detail}",
            "set the clock (enable NTP: timedatectl set-ntp true); JWTs are refused too",
        )
    detail = f"{now:%Y-%m-%d %H:%M:%S}Z, within the certificate's validity; {sync.detail}"
    if sync.synchronised:
        return detail
    return (
        f"{detail}: a clock off by more than the sink's leeway (30 s by default) gets its "
        "tokens refused; enable NTP (timedatectl set-ntp true, or chrony/ntpd)",
        True,
    )


def _certificate(uplink: UplinkConfig) -> str | tuple[str, bool]:
    certificate = _load_certificate(uplink.tls.cert)
    # (Its file may go on with the intermediates between it and the CA, as OpenSSL sends them.)
    chain = x509.load_pem_x509_certificates(uplink.tls.cert.read_bytes())[1:]
    issuer = "issued by the configured CA"
    try:
        authority = x509.load_pem_x509_certificates(uplink.tls.ca.read_bytes())
    except ValueError as exc:
        # A form only OpenSSL reads (TRUSTED CERTIFICATE): the uplink takes it (1bd927f), and
        # the handshake checks the issuer.
        if not openssl_reads_certificates(uplink.tls.ca):
            raise _Failed(
                f"{uplink.tls.ca} is not a PEM certificate: {exc}", "use the CA's ca.pem"
            ) from None
        authority = None
        issuer = (
            f"issuer not checked ({uplink.tls.ca} is in a form only OpenSSL reads: the TLS"
            " handshake checks it)"
        )
    if authority is not None and not chains_to(certificate, chain, authority):
        raise _Failed(
            f"{uplink.tls.cert} was not issued by the CA in {uplink.tls.ca}",
            "use the device certificate and the CA of the same PKI (bridge-certs list)",
        )
    left = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left.total_seconds() <= 0:
        raise _Failed(
            f"the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}",
            "issue a new one (bridge-certs device ...), install it, systemctl reload edge-agent",
        )
    detail = f"{issuer}, expires in {left.days} days"
    if left.days < CERTIFICATE_WARNING_DAYS:
        return detail + ": renew it soon", True
    return detail, authority is None


def _identity(device_id: str, uplink: UplinkConfig) -> str | tuple[str, bool]:
    """The certificate must name this device (its CN or its device SAN URI): our sink takes the
    device id from it and refuses a client id, user name or token ``sub`` that differ. With
    ``[uplink.token] mode = "none"`` (a standard broker) a warning: such a broker may not care."""
    names = certificate_identities(_load_certificate(uplink.tls.cert))
    if device_id in names:
        return f"the certificate names {device_id!r}"
    shown = " / ".join(sorted(names)) or "no single CN nor device SAN URI"
    problem = f"{uplink.tls.cert} is the certificate of {shown}, not of device_id {device_id!r}"
    if uplink.token.mode == "none":
        return f"{problem} (our sink would refuse it; a standard broker may not)", True
    raise _Failed(
        problem, "install this device's certificate, or set [agent] device_id to the certificate's"
    )


def _crl(uplink: UplinkConfig) -> str | tuple[str, bool]:
    assert uplink.tls.crl is not None
    try:
        crl = check_crl(uplink.tls.crl, uplink.tls.ca, refused=CRL_REFUSED)
    except TlsError as exc:
        raise _Failed(str(exc), "put a fresh CRL of the CA there (bridge-certs crl)") from None
    detail = f"{len(crl)} revoked"
    if crl.next_update_utc is None:
        return detail + ", no next update"
    left = crl.next_update_utc - dt.datetime.now(dt.UTC)
    detail += f", next update in {left.total_seconds() / 3600:.1f} hours"
    if left < CRL_WARNING:
        return detail + ": the sink is refused once it passes; fetch a fresh one soon", True
    return detail


def _key_matches(uplink: UplinkConfig) -> str:
    try:
        key = load_private_key(uplink.tls.key)
    except TokenUnavailable as exc:
        raise _Failed(str(exc), "use the key written next to the certificate") from None
    if not key_matches(key, _load_certificate(uplink.tls.cert)):
        raise _Failed(
            f"{uplink.tls.key} is not the key of {uplink.tls.cert}",
            "install the key that was issued with this certificate",
        )
    return "the private key matches the certificate"


def _token(config: AgentConfig, uplink: UplinkConfig) -> str | tuple[str, bool]:
    try:
        token = token_source(uplink, config.agent.device_id, SystemClock()).current()
    except TokenUnavailable as exc:
        raise _Failed(str(exc), "see [uplink.token] in the configuration") from None
    if token.value is None:
        return "mode none: no password is sent"
    if token.expires_at is None:
        return "token without expiry", True
    left = int(token.expires_at - time.time())
    return f"{uplink.token.mode} token, expires in {left}s"


def _dns(uplink: UplinkConfig) -> str:
    try:
        addresses = socket.getaddrinfo(uplink.host, uplink.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Failed(
            f"{uplink.host} does not resolve: {exc.strerror}",
            "check [uplink] host and the gateway's DNS (/etc/resolv.conf)",
        ) from None
    return f"{uplink.host} -> " + ", ".join(sorted({str(a[4][0]) for a in addresses}))


def _tcp(uplink: UplinkConfig) -> str:
    started = time.monotonic()
    try:
        with socket.create_connection((uplink.host, uplink.port), timeout=NETWORK_TIMEOUT):
            pass
    except OSError as exc:
        raise _Failed(
            f"cannot reach {uplink.host}:{uplink.port}: {exc.strerror or exc}",
            "check that the sink runs and that firewalls let the gateway out on this port",
        ) from None
    return f"{uplink.host}:{uplink.port} reachable in {1000 * (time.monotonic() - started):.0f} ms"


def _tls(uplink: UplinkConfig) -> str:
    try:
        context = client_context(uplink)
        with (
            socket.create_connection((uplink.host, uplink.port), timeout=NETWORK_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=uplink.host) as tls,
        ):
            version = tls.version()
    except TlsError as exc:
        raise _Failed(str(exc), "put a fresh CRL of the CA there (bridge-certs crl)") from None
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == X509_V_ERR_CERT_REVOKED:
            fix = f"the sink needs a new certificate: {uplink.tls.crl} lists its certificate"
        elif exc.verify_code == X509_V_ERR_UNABLE_TO_GET_CRL:
            fix = f"{uplink.tls.crl} must be the CRL of the CA that issued the sink's certificate"
        else:
            fix = f"the sink needs a certificate for {uplink.host!r} from the CA in {uplink.tls.ca}"
        raise _Failed(
            f"the server's certificate is not trusted: {exc.verify_message}", fix
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise _Failed(f"TLS handshake failed: {exc}", "check the CA and the server") from None
    return f"{version} with {uplink.host}, server certificate verified"


def _connack_code(exc: MqttConnectError) -> int | None:
    """The CONNACK return code of a refusal (MQTT 3.1.1's numbers)."""
    code = exc.rc if isinstance(exc.rc, int) or exc.rc is None else exc.rc.value
    return _V5_CODES.get(code, code) if code is not None else None


async def _connect(config: AgentConfig, uplink: UplinkConfig) -> str:
    token = token_source(uplink, config.agent.device_id, SystemClock()).current()
    device = config.agent.device_id
    username = uplink.username(device)
    try:
        async with aiomqtt.Client(
            uplink.host, uplink.port, identifier=device,
            username=username if token.value is not None or uplink.format != "raw" else None,
            password=token.value, tls_context=client_context(uplink),
            timeout=NETWORK_TIMEOUT, clean_session=True,
        ):  # fmt: skip
            pass
    except MqttConnectError as exc:
        # The sink refuses a token from a clock behind or ahead with "bad user name or
        # password" (its log: "token expired", "token issued Ns ago", "not valid yet"). A sink
        # whose core queue is down answers "server unavailable": no setting here is wrong.
        fix = CONNACK_FIXES.get(_connack_code(exc) or 0, _CREDENTIALS_FIX)
        raise _Failed(f"the server refused the CONNECT: {exc}", fix) from None
    except aiomqtt.MqttError as exc:
        raise _Failed(
            f"no CONNACK: {exc}",
            "the server dropped the connection after TLS: most likely it refused the client "
            "certificate (revoked, or from another CA); check the sink's log",
        ) from None
    return f"CONNACK accepted for {device} ({uplink.format}, token {uplink.token.mode})"
