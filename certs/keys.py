"""Private keys: the types the PKI issues, generated, loaded, written as PEM."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from certs.errors import KeyUnreadable

__all__ = ["KeyType", "PrivateKey", "generate_key", "key_pem", "load_private_key", "signing_hash"]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    ED25519 = "ed25519"


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    bits = 2048 if key_type is KeyType.RSA_2048 else 3072
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def load_private_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM private key; `KeyUnreadable` says why it could not be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyUnreadable(path, exc.strerror or str(exc)) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise KeyUnreadable(path, "it is encrypted; this tool keeps keys unencrypted") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyUnreadable(path, "not a PEM private key") from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise KeyUnreadable(path, f"unsupported key type {type(key).__name__}")
    return key


def signing_hash(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; the others sign a SHA-256 digest.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
