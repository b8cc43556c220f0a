"""JWT algorithms pinned to key types, shared by the agent (signing) and the sink (verifying).

One algorithm per key type (SPEC §6): ES256 for P-256, RS256 for RSA, EdDSA for Ed25519. Never
``none``, never HMAC, never what a token header asks for.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["PrivateKey", "PublicKey", "algorithm_for"]

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def algorithm_for(key: PublicKey) -> str:
    """The one JWT algorithm accepted for ``key``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256 only)")
        return "ES256"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__}")
