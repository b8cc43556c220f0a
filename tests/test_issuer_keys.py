"""Issuer keys for issuer-signed tokens (SPEC §6): PEM files or a JWKS file, selected by kid."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from cloud_sink.auth import JwtAuthenticator, thumbprint
from cloud_sink.config import parse_config
from cloud_sink.issuer_keys import read_issuer_keys
from cloud_sink.service import auth_settings, preflight
from mqtt_ingest import ConnectRequest, Identity
from tests.harness.pki import Pki
from tests.harness.sink import AUD, write_sink_config

ISSUER = "https://issuer.test"


def jwk(public: Any, **fields: Any) -> dict[str, Any]:
    if isinstance(public, ec.EllipticCurvePublicKey):
        text = ECAlgorithm.to_jwk(public)
    elif isinstance(public, rsa.RSAPublicKey):
        text = RSAAlgorithm.to_jwk(public)
    else:
        text = OKPAlgorithm.to_jwk(public)
    return {**json.loads(text), **fields}


def pem(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_a_jwks_file_gives_each_key_its_kid(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = tmp_path / "issuer.jwks"
    jwks.write_text(
        json.dumps(
            {
                "keys": [
                    jwk(ec_key.public_key(), kid="ec-1", alg="ES256", use="sig"),
                    jwk(ed_key.public_key(), kid="ed-1"),
                    jwk(rsa_key.public_key(), kid="rsa-1", alg="RS256"),
                ]
            }
        )
    )
    single = tmp_path / "k1.pem"
    single.write_bytes(pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    keys, problems = read_issuer_keys([jwks, single])
    assert problems == []
    assert sorted(keys) == ["ec-1", "ed-1", "k1", "rsa-1"]
    assert keys["ed-1"] == ed_key.public_key()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"alg": "ES256"}, 'no "kid"'),
        ({"kid": "a", "alg": "HS256"}, "only ES256 is used for it"),  # never what the file says
        ({"kid": "a", "use": "enc"}, "is not 'sig'"),
        ({"kid": "a", "d": "secret"}, "a private or symmetric key"),
        ({"kty": "oct", "k": "c2VjcmV0", "kid": "a", "x": None, "y": None}, "symmetric"),
        ({"kid": "a", "crv": "P-384"}, ""),
    ],
)
def test_unusable_jwks_entries_are_named(tmp_path: Path, entry: dict[str, Any], why: str) -> None:
    base = jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    entry = {k: v for k, v in {**base, **entry}.items() if v is not None}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry]}))
    keys, problems = read_issuer_keys([path])
    assert keys == {}
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"auth.issuer_keys[0]: {path}: keys[0]:")
    assert why in problems[0]


def test_a_kid_given_twice_is_an_error(tmp_path: Path) -> None:
    """old/k1.pem and new/k1.pem: one key used to win silently."""
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "k1.pem").write_bytes(
            pem(ec.generate_private_key(ec.SECP256R1()).public_key())
        )
    second = tmp_path / "new" / "k1.pem"
    _, problems = read_issuer_keys([tmp_path / "old" / "k1.pem", second])
    assert problems == [f"auth.issuer_keys[1]: {second}: kid 'k1' is given twice"]


async def test_a_token_signed_by_a_jwks_key_is_accepted_by_kid(tmp_path: Path, pki: Pki) -> None:
    device = pki.device("jwks-dev")
    issuer = ed25519.Ed25519PrivateKey.generate()
    jwks = tmp_path / "issuer.jwks"
    jwks.write_text(json.dumps({"keys": [jwk(issuer.public_key(), kid="2026-12")]}))
    text = write_sink_config(tmp_path, pki).read_text()
    text = text.replace(
        "[auth]\n",
        f'[auth]\nmode = "issuer-signed"\nissuer = "{ISSUER}"\nissuer_keys = ["{jwks}"]\n',
    )
    config = parse_config(text)
    assert preflight(config) == []
    auth = JwtAuthenticator(auth_settings(config))
    certificate = x509.load_pem_x509_certificate(device.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": device.device_id, "aud": AUD, "iss": ISSUER, "iat": now, "exp": now + 300,
            "cnf": {"x5t#S256": thumbprint(certificate)},
        },
        issuer,
        algorithm="EdDSA",
        headers={"kid": "2026-12"},
    )  # fmt: skip
    request = ConnectRequest(
        client_id=device.device_id,
        username=device.device_id,
        password=token.encode(),
        clean_session=True,
        keep_alive=60,
        peer_certificate=certificate,
        peer_address="127.0.0.1:1",
    )
    assert isinstance(await auth.authenticate(request), Identity)


def test_an_issuer_key_on_a_curve_cryptography_lacks_is_a_problem(tmp_path: Path) -> None:
    """cryptography raised UnsupportedAlgorithm (not a ValueError): `check-config` and `run`
    ended with a traceback and exit 1 (restarted in a loop by systemd, where a config error's
    exit 2 stops it), and a SIGHUP with it was no "reload refused"."""
    key, public = tmp_path / "brainpool.key", tmp_path / "brainpool.pem"
    for command in (
        ["openssl", "ecparam", "-name", "brainpoolP160r1", "-genkey", "-noout", "-out", str(key)],
        ["openssl", "ec", "-in", str(key), "-pubout", "-out", str(public)],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    keys, problems = read_issuer_keys([public])
    assert keys == {}
    assert len(problems) == 1
    assert problems[0].startswith(f"auth.issuer_keys[0]: {public}: unsupported key: "), problems
