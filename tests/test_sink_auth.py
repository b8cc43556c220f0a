"""Certificate-bound JWT authentication (SPEC §6, RELIABILITY F17): each attack refused with its
own reason, before anything is acknowledged."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from certs import KeyType
from cloud_sink.auth import AuthSettings, JwtAuthenticator, thumbprint
from edge_agent.token import DeviceSignedTokens
from mqtt_ingest import ConnackCode, ConnectRequest, FakeClock, Identity, Refusal
from mqtt_ingest.identity import san_uri_identity
from tests.harness.pki import DeviceCreds, Pki
from tests.harness.stages import RecordingStage, running_server

NOW = 1_800_000_000.0
AUD = "sink.example.com"


def der(creds: DeviceCreds) -> bytes:
    cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def private_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def token(creds: DeviceCreds, alg: str = "ES256", key: Any = None, **claims: Any) -> bytes:
    body: dict[str, Any] = {"sub": creds.device_id, "aud": AUD, "iat": NOW, "exp": NOW + 600}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key or private_key(creds.key), algorithm=alg).encode()


def request(creds: DeviceCreds, password: bytes | None, **overrides: Any) -> ConnectRequest:
    fields: dict[str, Any] = {
        "client_id": creds.device_id,
        "username": creds.device_id,
        "password": password,
        "clean_session": True,
        "keep_alive": 60,
        "peer_certificate": der(creds),
        "peer_address": "127.0.0.1:1",
    }
    fields.update(overrides)
    return ConnectRequest(**fields)


def device_auth(**settings: Any) -> JwtAuthenticator:
    return JwtAuthenticator(AuthSettings(audience=AUD, **settings), FakeClock(start=NOW))


@pytest.fixture(scope="module")
def dev(pki: Pki) -> DeviceCreds:
    return pki.device(f"auth-{uuid.uuid4().hex[:8]}")


async def refused(auth: JwtAuthenticator, req: ConnectRequest) -> Refusal:
    outcome = await auth.authenticate(req)
    assert isinstance(outcome, Refusal), f"accepted: {outcome}"
    return outcome


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048, KeyType.ED25519])
async def test_device_signed_token_for_each_key_type(pki: Pki, key_type: KeyType) -> None:
    creds = pki.device(f"kt-{key_type.value}-{uuid.uuid4().hex[:6]}", key_type=key_type)
    alg = {KeyType.EC_P256: "ES256", KeyType.RSA_2048: "RS256", KeyType.ED25519: "EdDSA"}[key_type]
    outcome = await device_auth().authenticate(
        request(creds, token(creds, alg), username=f"{creds.device_id}?format=batch-v1")
    )
    assert isinstance(outcome, Identity)
    assert outcome.name == creds.device_id
    assert outcome.attributes == {"format": "batch-v1"}
    assert outcome.expires_at == NOW + 600 + 30


def test_a_certificate_whose_extensions_do_not_parse_has_no_san_identity() -> None:
    """cryptography raises ValueError on such extensions: it was a traceback at CONNECT."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-bad-san")])
    now = dt.datetime.now(dt.UTC)
    garbage = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x86\x01")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(garbage, critical=False)
        .sign(key, hashes.SHA256())
    )
    assert san_uri_identity(cert) == ""


async def test_a_connection_ends_with_its_certificate_if_that_ends_first(dev: DeviceCreds) -> None:
    """A token outliving the certificate kept the connection up to max_lifetime past the
    certificate's end; at CONNECT, an expired certificate is refused whatever the token says."""
    cert = x509.load_pem_x509_certificate(dev.cert.read_bytes())
    end = cert.not_valid_after_utc.timestamp()
    auth = JwtAuthenticator(AuthSettings(audience=AUD), FakeClock(start=end - 100))
    late = token(dev, iat=end - 100, exp=end + 500)
    outcome = await auth.authenticate(request(dev, late))
    assert isinstance(outcome, Identity)
    assert outcome.expires_at == end
    after = JwtAuthenticator(AuthSettings(audience=AUD), FakeClock(start=end + 10))
    fresh = token(dev, iat=end + 5, exp=end + 500)
    assert (await refused(after, request(dev, fresh))).reason == "certificate expired"


async def test_f17_attacks_each_refused_with_its_reason(pki: Pki, dev: DeviceCreds) -> None:
    auth = device_auth()
    other = pki.device(f"other-{uuid.uuid4().hex[:8]}")
    public_pem = (
        x509.load_pem_x509_certificate(dev.cert.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    unsigned = _forged(dev, "none", b"")
    other_p256 = ec.generate_private_key(ec.SECP256R1())
    cases: dict[str, tuple[ConnectRequest, str, int]] = {
        "alg none": (request(dev, unsigned), "algorithm 'none' not allowed", 4),
        "HS256 with the public key": (
            request(dev, _forged(dev, "HS256", public_pem)),
            "algorithm 'HS256' not allowed",
            4,
        ),
        "wrong alg for the key": (
            request(dev, token(dev, "ES384", ec.generate_private_key(ec.SECP384R1()))),
            "algorithm 'ES384' not allowed",
            4,
        ),
        "signed by another key": (request(dev, token(dev, key=other_p256)), "bad signature", 4),
        "missing exp": (request(dev, token(dev, exp=None)), "token without exp", 4),
        "missing aud": (request(dev, token(dev, aud=None)), "token without aud", 4),
        "wrong aud": (request(dev, token(dev, aud="elsewhere")), "wrong audience", 4),
        "expired": (request(dev, token(dev, iat=NOW - 700, exp=NOW - 100)), "token expired", 4),
        "from the future": (
            request(dev, token(dev, iat=NOW + 300, exp=NOW + 900)),
            "not valid yet",
            4,
        ),
        "lifetime over max": (
            request(dev, token(dev, exp=NOW + 7200)),
            "lifetime 7200s over the maximum 3600s",
            4,
        ),
        "sub is another device": (
            request(dev, token(dev, sub=other.device_id)),
            "sub does not match",
            4,
        ),
        "another device's valid token": (
            request(dev, token(other)),
            "bad signature",
            4,
        ),
        "client id is another device": (
            request(dev, token(dev), client_id=other.device_id),
            "client id does not match",
            2,
        ),
        "user name is another device": (
            request(dev, token(dev), username=other.device_id),
            "user name does not match",
            4,
        ),
        "no token": (request(dev, None), "no token", 4),
        "unknown format": (
            request(dev, token(dev), username=f"{dev.device_id}?format=batch-v9"),
            "unsupported format 'batch-v9'",
            4,
        ),
        "garbage token": (request(dev, b"\xff\xfe not a jwt"), "malformed token", 4),
        # PyJWT raises these as InvalidTokenError, not DecodeError: they used to escape as a
        # traceback with no CONNACK.
        "kid not a string": (
            request(dev, _forged(dev, "ES256", b"", {"kid": 1})),
            "malformed token",
            4,
        ),
        "unknown critical header": (
            request(dev, _forged(dev, "ES256", b"", {"crit": ["x-unknown"]})),
            "malformed token",
            4,
        ),
        "no certificate": (request(dev, token(dev), peer_certificate=None), "no client cert", 5),
    }
    labels = set()
    for name, (req, reason, code) in cases.items():
        outcome = await refused(auth, req)
        assert reason in outcome.reason, f"{name}: {outcome.reason}"
        assert outcome.code == code, f"{name}: code {outcome.code}"
        labels.add(outcome.label or outcome.reason)
    # What goes into the metrics never quotes the client: a fixed label where the reason does.
    assert "unsupported format" in labels
    assert not any("batch-v9" in label for label in labels)


@pytest.mark.parametrize(
    "claims",
    [
        # With iat NaN every time comparison is false: this token passed as a ten-year session.
        {"iat": math.nan, "exp": NOW + 10 * 365 * 86400},
        {"iat": "nan", "exp": NOW + 10 * 365 * 86400},
        {"exp": math.inf},
        {"exp": 10**400},
        {"nbf": math.nan},
        {"iat": True},
        {"exp": str(NOW + 600)},
    ],
    ids=["iat NaN", "iat 'nan'", "exp Infinity", "exp 10**400", "nbf NaN", "iat true", "exp str"],
)
async def test_token_times_that_are_not_finite_numbers_are_refused(
    dev: DeviceCreds, claims: dict[str, Any]
) -> None:
    outcome = await refused(device_auth(), request(dev, token(dev, **claims)))
    assert outcome.reason == "token times are not finite numbers"
    assert outcome.code == ConnackCode.BAD_USERNAME_OR_PASSWORD


def _forged(
    creds: DeviceCreds, alg: str, secret: bytes, header: dict[str, Any] | None = None
) -> bytes:
    """A token pyjwt would refuse to make: ``alg`` none, HMAC keyed with a public key, or
    ``header`` fields of the wrong type."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = {"alg": alg, "typ": "JWT", **(header or {})}
    claims = {"sub": creds.device_id, "aud": AUD, "iat": NOW, "exp": NOW + 60}
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest() if secret else b""
    return signing_input + b"." + b64(signature)


async def test_deny_list_and_identity_from_san_uri(pki: Pki, dev: DeviceCreds) -> None:
    denied = await refused(device_auth(deny=frozenset({dev.device_id})), request(dev, token(dev)))
    assert denied.reason == "device is on the deny list"
    assert denied.code == ConnackCode.NOT_AUTHORIZED
    by_uri = await device_auth(identity_source="san-uri").authenticate(request(dev, token(dev)))
    assert isinstance(by_uri, Identity)
    assert by_uri.name == dev.device_id
    # A SAN URI is ASCII: bridge-certs percent-encodes the id, the sink decodes it.
    accented = pki.device(f"gerät-{uuid.uuid4().hex[:6]}")
    decoded = await device_auth(identity_source="san-uri").authenticate(
        request(accented, token(accented))
    )
    assert isinstance(decoded, Identity)
    assert decoded.name == accented.device_id


async def test_issuer_signed_token_bound_to_the_certificate(pki: Pki, dev: DeviceCreds) -> None:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    auth = device_auth(
        mode="issuer-signed", issuer="https://issuer", issuer_keys={"k1": issuer_key.public_key()}
    )
    bound = {"x5t#S256": thumbprint(der(dev))}

    def issued(**claims: Any) -> bytes:
        body = {"iss": "https://issuer", "cnf": bound, **claims}
        return jwt.encode(
            {"sub": dev.device_id, "aud": AUD, "iat": NOW, "exp": NOW + 600, **body},
            issuer_key,
            algorithm="ES256",
            headers={"kid": claims.pop("kid", "k1")},
        ).encode()

    assert isinstance(await auth.authenticate(request(dev, issued())), Identity)
    other = pki.device(f"thief-{uuid.uuid4().hex[:6]}")
    stolen = request(other, issued(sub=other.device_id))  # bound to dev's certificate
    assert "another certificate" in (await refused(auth, stolen)).reason
    assert "wrong issuer" in (await refused(auth, request(dev, issued(iss="https://evil")))).reason
    no_cnf = jwt.encode(
        {"sub": dev.device_id, "aud": AUD, "iat": NOW, "exp": NOW + 60, "iss": "https://issuer"},
        issuer_key,
        algorithm="ES256",
        headers={"kid": "k1"},
    ).encode()
    assert "without cnf" in (await refused(auth, request(dev, no_cnf))).reason
    unknown_kid = jwt.encode(
        {"sub": dev.device_id}, issuer_key, algorithm="ES256", headers={"kid": "k9"}
    ).encode()
    assert (await refused(auth, request(dev, unknown_kid))).reason == "unknown kid"
    # A token signed by the device itself is not an issuer token.
    assert "unknown kid" in (await refused(auth, request(dev, token(dev)))).reason


async def test_through_the_ingest_server_over_mutual_tls(pki: Pki, dev: DeviceCreds) -> None:
    """A real client: accepted with a good token, CONNACK 4 with a bad one; nothing stored."""
    stage = RecordingStage()
    auth = JwtAuthenticator(AuthSettings(audience=AUD))
    now_token = jwt.encode(
        {"sub": dev.device_id, "aud": AUD, "iat": int(_now()), "exp": int(_now()) + 300},
        private_key(dev.key),
        algorithm="ES256",
    )
    async with running_server(stage, authenticator=auth, ssl_context=pki.server_context()) as s:
        context = pki.client_context(dev)
        async with aiomqtt.Client(
            "localhost", s.port, identifier=dev.device_id, username=dev.device_id,
            password=now_token, tls_context=context,
        ) as client:  # fmt: skip
            await client.publish("devices/x/t", b"ok", qos=1)
        with pytest.raises(aiomqtt.MqttCodeError) as info:
            async with aiomqtt.Client(
                "localhost", s.port, identifier=dev.device_id, username=dev.device_id,
                password="not-a-token", tls_context=context,
            ):  # fmt: skip
                pass
        assert info.value.rc in (4, 134)  # "bad user name or password" (paho maps 3.1.1 codes)
    assert stage.payloads() == [b"ok"]


async def test_a_refused_connect_is_one_log_line_with_its_reason(
    pki: Pki, dev: DeviceCreds, caplog: pytest.LogCaptureFixture
) -> None:
    """F11: one clear line per refusal. The authenticator logged it at WARNING too, so every
    refused CONNECT was two lines; the connection's line (with the reason) is the one."""
    auth = JwtAuthenticator(AuthSettings(audience=AUD))
    reason = (await refused(auth, request(dev, b"not-a-token"))).reason
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    async with running_server(
        RecordingStage(), authenticator=auth, ssl_context=pki.server_context()
    ) as server:
        with pytest.raises(aiomqtt.MqttCodeError):
            async with aiomqtt.Client(
                "localhost", server.port, identifier=dev.device_id, username=dev.device_id,
                password="not-a-token", tls_context=pki.client_context(dev),
            ):  # fmt: skip
                pass
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "refused CONNECT" in said[0]
    assert said[0].endswith(f": {reason}")


def _now() -> float:
    return time.time()


@pytest.mark.parametrize(
    ("skew", "refusal"),
    [
        (59, None),
        (61, "token not valid yet"),
        (600, "token not valid yet"),
        (-61, None),
        (-63, "token issued 63s ago: the device clock is behind?"),
        (-159, "token issued 159s ago: the device clock is behind?"),
        (-161, "token expired"),
        (-600, "token expired"),
    ],
)
async def test_clock_skew_against_a_60s_leeway(
    dev: DeviceCreds, skew: float, refusal: str | None
) -> None:
    """F11: the device's clock is ``skew`` seconds off the sink's when it mints a 100 s token,
    checked by the sink at once with 60 s of leeway: a device ahead by more than the leeway is
    "not valid yet", one behind by more than lifetime + leeway is "expired", and one behind by
    more than the leeway (a second more: JWT times are whole seconds) is refused for its clock:
    accepted, its connection would be closed at exp + leeway (our clock) before the device
    renews it (renew_before ahead of exp on its clock)."""
    auth = JwtAuthenticator(AuthSettings(audience=AUD, leeway=60), FakeClock(start=NOW))
    minted = token(dev, iat=NOW + skew, exp=NOW + skew + 100)
    outcome = await auth.authenticate(request(dev, minted))
    if refusal is None:
        assert isinstance(outcome, Identity)
    else:
        assert isinstance(outcome, Refusal)
        assert outcome.reason == refusal


@pytest.mark.parametrize("behind", [0, 20, 30, 32, 290, 600])
def test_a_device_clock_behind_is_accepted_only_if_the_device_renews_before_our_close(
    dev: DeviceCreds, behind: int
) -> None:
    """The agent plans its renewal renew_before (5 min) ahead of exp on its clock; the sink
    closes at exp + leeway (30 s) on its own. Accepted, a device more than renew_before + leeway
    behind had every connection cut at exp before renewing (at 1 h tokens: each hour). Now: a
    device clock behind by more than the leeway is refused at CONNECT, saying why."""
    tokens = DeviceSignedTokens(
        dev.device_id, dev.key, AUD, 3600, FakeClock(start=NOW - behind + 0.5)
    )
    minted = tokens.current()
    assert minted.value is not None
    assert minted.expires_at is not None
    auth = JwtAuthenticator(AuthSettings(audience=AUD), FakeClock(start=NOW + 0.5))
    outcome = auth.check(request(dev, minted.value.encode()))
    if behind > 30:
        assert isinstance(outcome, Refusal), outcome
        assert outcome.reason == f"token issued {behind}s ago: the device clock is behind?"
        return
    assert isinstance(outcome, Identity), outcome
    assert outcome.expires_at is not None
    renewal = minted.expires_at - 300 + behind  # on our clock
    assert renewal < outcome.expires_at


async def test_a_device_signed_token_is_judged_fresh_as_of_its_connect(dev: DeviceCreds) -> None:
    """The sink's reload judges open connections again by the request they connected with: a
    device-signed token minted at that CONNECT is older now, which is no reason to close the
    connection (``again``); a CONNECT with it now is refused."""
    clock = FakeClock(start=NOW)
    auth = JwtAuthenticator(AuthSettings(audience=AUD, leeway=30), clock)
    connect = request(dev, token(dev, iat=NOW, exp=NOW + 3600))
    assert isinstance(auth.check(connect), Identity)
    clock.advance(1800)
    outcome = auth.check(connect, again=True)
    assert isinstance(outcome, Identity)
    assert outcome.expires_at == NOW + 3600 + 30
    refusal = auth.check(connect)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "token issued 1800s ago: the device clock is behind?"
    assert refusal.label == "token issued too long ago"


async def test_an_issuer_signed_token_may_have_been_issued_long_ago(
    pki: Pki, dev: DeviceCreds
) -> None:
    """A token file's token is issued once and used for many connections: no freshness rule."""
    issuer = ec.generate_private_key(ec.SECP256R1())
    auth = JwtAuthenticator(
        AuthSettings(
            audience=AUD, mode="issuer-signed", issuer="https://iss",
            issuer_keys={"k1": issuer.public_key()},
        ),
        FakeClock(start=NOW),
    )  # fmt: skip
    claims = {
        "sub": dev.device_id, "aud": AUD, "iss": "https://iss", "iat": NOW - 3000,
        "exp": NOW + 600, "cnf": {"x5t#S256": thumbprint(der(dev))},
    }  # fmt: skip
    minted = jwt.encode(claims, issuer, algorithm="ES256", headers={"kid": "k1"}).encode()
    assert isinstance(await auth.authenticate(request(dev, minted)), Identity)


def signed_by_the_ca(pki: Pki, common_names: Sequence[str]) -> ConnectRequest:
    """A CONNECT with a certificate of the platform CA whose subject has ``common_names``
    (issued by other tooling than bridge-certs, which refuses such names) and a valid token."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names = [x509.NameAttribute(NameOID.COMMON_NAME, n) for n in common_names]
    ca = pki.ca
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    name = common_names[0] if common_names else "x"
    claims = {"sub": name, "aud": AUD, "iat": NOW, "exp": NOW + 60}
    password = jwt.encode(claims, key, algorithm="ES256").encode()
    return ConnectRequest(
        client_id=name,
        username=name,
        password=password,
        clean_session=True,
        keep_alive=60,
        peer_certificate=certificate.public_bytes(serialization.Encoding.DER),
        peer_address="127.0.0.1:1",
    )


async def test_a_certificate_with_two_common_names_names_nobody(pki: Pki) -> None:
    """Tools disagree on which of several CNs names the subject (Go takes the last): such a
    certificate is refused, as one with several device SAN URIs is."""
    req = signed_by_the_ca(pki, ["dev-ok", "dev-denied"])
    outcome = await refused(device_auth(deny=frozenset({"dev-denied"})), req)
    assert outcome.reason.startswith("certificate identity")
    assert outcome.code == ConnackCode.NOT_AUTHORIZED


@pytest.mark.parametrize(
    "identity",
    [
        "+", "#", "a/b", "dev/+/x", "dev\x00x", " ", "dev?x",
        # What a consumer that percent-decodes, NFKC-normalises or reads '\\' as a separator
        # (mqtt_ingest/topics.py) turns into '..' or '/': 'devices/%2E%2E/devices/victim/t'
        # is 'devices/victim/t' there.
        "%2E%2E", "\uff0e\uff0e", "victim\uff0fspoof", "victim\\spoof", "victim%2Fspoof",
        "cafe\u0301-1",  # reads as the NFC 'café-1', another id (a deny list misses it)
    ],
)  # fmt: skip
async def test_a_certificate_naming_a_forbidden_identity_is_refused(
    pki: Pki, identity: str
) -> None:
    """RELIABILITY F18: identities `+`, `#`, `a/b`, ... (from a CA that issued them) name no
    device: as topic prefixes they would match or reach other devices' topics."""
    outcome = await refused(device_auth(), signed_by_the_ca(pki, [identity]))
    assert outcome.reason.startswith("certificate identity"), outcome.reason
    assert outcome.code == ConnackCode.NOT_AUTHORIZED


def sect283k1_device(directory: Path, pki: Pki) -> DeviceCreds:
    """A device certificate from the CA whose key is on a curve cryptography lacks."""
    key, csr, cert = (directory / name for name in ("dev.key", "dev.csr", "dev.pem"))
    for command in (
        ["openssl", "ecparam", "-name", "sect283k1", "-genkey", "-noout", "-out", str(key)],
        ["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=dev-curve", "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki.ca.cert_path), "-CAkey",
         str(pki.ca.key_path), "-set_serial", "7", "-days", "1", "-out", str(cert)],
    ):  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    return DeviceCreds("dev-curve", cert, key, 7)


async def test_a_device_key_on_a_curve_cryptography_lacks_is_refused(
    tmp_path: Path, pki: Pki
) -> None:
    """Reading the key of such a certificate raised UnsupportedAlgorithm out of `authenticate`:
    the device got no CONNACK, and the server logged a traceback as an internal error at every
    retry."""
    creds = sect283k1_device(tmp_path, pki)
    header = base64.urlsafe_b64encode(b'{"alg":"ES256","typ":"JWT"}').rstrip(b"=")
    outcome = await refused(device_auth(), request(creds, header + b".e30.c2ln"))
    assert outcome.reason == "certificate key type not supported"
