"""The issuer's public keys for ``issuer-signed`` tokens (SPEC §6), selected by ``kid``.

``[auth] issuer_keys`` lists files of two kinds, told apart by their content:

- a PEM public key: its ``kid`` is the file name without its extension (``k1.pem`` -> ``k1``);
- a JWKS file (RFC 7517, JSON ``{"keys": [...]}``, as identity providers publish them): every key
  needs its ``kid``; ``use``, when present, must be ``sig``; ``alg``, when present, must be the one
  algorithm we pin to that key type (ES256 for P-256, RS256 for RSA, EdDSA for Ed25519), never
  what the file says instead. Private keys and symmetric (``oct``) keys are refused.

A ``kid`` given twice (two files ``old/k1.pem`` and ``new/k1.pem``, or twice in a JWKS) is an
error: one of the two keys would silently win.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from mqtt_ingest.keys import PublicKey, algorithm_for

__all__ = ["read_issuer_keys"]


def read_issuer_keys(paths: Sequence[Path]) -> tuple[dict[str, PublicKey], list[str]]:
    """The keys by ``kid``, and every problem found as ``auth.issuer_keys[i]: path: why``."""
    keys: dict[str, PublicKey] = {}
    problems: list[str] = []
    for index, path in enumerate(paths):
        where = f"auth.issuer_keys[{index}]: {path}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{where}: cannot read: {exc.strerror}")
            continue
        if data.lstrip().startswith(b"{"):
            found, errors = _jwks(data)
        else:
            found, errors = _pem(data, path.stem)
        problems += [f"{where}: {error}" for error in errors]
        for kid, key in found:
            if kid in keys:
                problems.append(f"{where}: kid {kid!r} is given twice")
            keys[kid] = key
    return keys, problems


def _pem(data: bytes, kid: str) -> tuple[list[tuple[str, PublicKey]], list[str]]:
    try:
        key = load_pem_public_key(data)
    except UnsupportedAlgorithm as exc:  # an EC curve OpenSSL or cryptography does not have
        return [], [f"unsupported key: {exc}"]
    except (ValueError, TypeError) as exc:
        return [], [f"not a PEM public key nor a JWKS file: {exc}"]
    if not isinstance(key, PublicKey):
        return [], [f"unsupported key type {type(key).__name__}"]
    try:
        algorithm_for(key)
    except ValueError as exc:
        return [], [str(exc)]
    return [(kid, key)], []


def _jwks(data: bytes) -> tuple[list[tuple[str, PublicKey]], list[str]]:
    try:
        document = json.loads(data)
    except ValueError as exc:
        return [], [f"not valid JSON: {exc}"]
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        return [], ['a JWKS file needs a non-empty "keys" list']
    found: list[tuple[str, PublicKey]] = []
    problems: list[str] = []
    for number, entry in enumerate(entries):
        try:
            found.append(_jwk(entry))
        except ValueError as exc:
            problems.append(f"keys[{number}]: {exc}")
    return found, problems


def _jwk(entry: Any) -> tuple[str, PublicKey]:
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError('no "kid" (a key is selected by the kid of the token header)')
    if any(field in entry for field in ("d", "p", "q", "k")):
        raise ValueError(f"kid {kid!r}: a private or symmetric key; give the public key only")
    if entry.get("use", "sig") != "sig":
        raise ValueError(f"kid {kid!r}: use {entry['use']!r} is not 'sig'")
    try:
        # Without its alg: the key type and curve choose; the alg it names is checked below.
        key = jwt.PyJWK({name: value for name, value in entry.items() if name != "alg"}).key
    except (jwt.PyJWTError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"kid {kid!r}: {exc}") from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"kid {kid!r}: unsupported key type {type(key).__name__}")
    pinned = algorithm_for(key)  # ValueError for a curve other than P-256
    if entry.get("alg", pinned) != pinned:
        raise ValueError(f"kid {kid!r}: alg {entry['alg']!r}, but only {pinned} is used for it")
    return kid, key
