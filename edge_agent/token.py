"""The JWT the uplink sends as its MQTT password (SPEC §6).

- `DeviceSignedTokens`: a fresh token per connection, signed with the device's own key
  (ES256 / RS256 / EdDSA by key type), ``sub`` = device id, ``aud``, ``iat``, ``exp``.
- `TokenFile`: an issuer-signed token read from a file, re-read whenever the file changes; its
  ``exp`` is read (not verified: the agent has no issuer key) to reconnect before it expires and
  to warn in ``status``.
- `NoToken`: no password, for a standard broker that authenticates by certificate only.

Each source returns a `Token` or raises `TokenUnavailable` saying what is wrong with the files.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from jwt.utils import base64url_decode

from edge_agent.config import UplinkConfig
from mqtt_ingest.clock import Clock
from mqtt_ingest.keys import PrivateKey, algorithm_for

__all__ = [
    "DeviceSignedTokens",
    "NoToken",
    "Token",
    "TokenFile",
    "TokenSource",
    "TokenUnavailable",
    "load_private_key",
    "token_source",
]

log = logging.getLogger(__name__)


class TokenUnavailable(Exception):
    """No usable token: missing or unreadable file, malformed or expired token."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str | None  # None: connect without a password
    expires_at: float | None  # unix seconds; None: does not expire (or unknown)
    issued_at: float | None = None  # a token file's iat, if it has a usable one (for `status`)


class TokenSource(Protocol):
    def current(self) -> Token:
        """The token for the next connection; raise `TokenUnavailable`."""
        ...

    def changed(self) -> bool:
        """Whether `current` would read something new (a token file changed since): the uplink
        ends a back-off for it."""
        ...


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise TokenUnavailable(f"cannot read the device key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise TokenUnavailable(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, PrivateKey):
        raise TokenUnavailable(f"{path}: unsupported key type {type(key).__name__}")
    return key


class DeviceSignedTokens:
    def __init__(
        self, device_id: str, key_path: Path, audience: str, lifetime: float, clock: Clock
    ) -> None:
        self._device_id = device_id
        self._key_path = key_path
        self._audience = audience
        self._lifetime = lifetime
        self._clock = clock
        self._key: PrivateKey | None = None
        self._algorithm = ""

    def current(self) -> Token:
        if self._key is None:
            # Loaded once (and again by a reload): a key file broken later does not break the link.
            key = load_private_key(self._key_path)
            try:
                self._algorithm = algorithm_for(key.public_key())
            except ValueError as exc:
                raise TokenUnavailable(f"{self._key_path}: {exc}") from None
            self._key = key
        key, algorithm = self._key, self._algorithm
        now = int(self._clock.time())
        expires = now + int(self._lifetime)
        claims = {"sub": self._device_id, "aud": self._audience, "iat": now, "exp": expires}
        return Token(jwt.encode(claims, key, algorithm=algorithm), float(expires))

    def changed(self) -> bool:
        return False  # minted per connection: nothing to wait for


class TokenFile:
    """``device_id``, ``audience``: what the token must be for (``sub``, ``aud``); a file holding
    another device's token (the wrong file copied) is a broken new file, not a fresh token."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        device_id: str | None = None,
        audience: str | None = None,
    ) -> None:
        self._path = path
        self._clock = clock
        self._device_id = device_id
        self._audience = audience
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns)
        self._token: Token | None = None
        self._reported = ""  # the problem last logged: each attempt would log it again

    def current(self) -> Token:
        """The file's token, read again whenever the file changed. A file that turns unreadable
        or malformed, or holds a token for another device or audience, keeps the token read
        before in use while that one is valid."""
        try:
            info = os.stat(self._path)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if signature != self._seen or self._token is None:
                self._seen = signature
                text = self._path.read_text().strip()
                self._token = _parse_token(text, self._path, self._device_id, self._audience)
            self._reported = ""
        except (OSError, TokenUnavailable) as exc:
            problem = (
                f"cannot read the token file {self._path}: {exc.strerror}"
                if isinstance(exc, OSError)
                else str(exc)
            )
            if self._token is None or self._expired(self._token):
                raise TokenUnavailable(problem) from None
            if problem != self._reported:
                self._reported = problem
                log.warning("uplink: %s; still using the token read before", problem)
        token = self._token
        if self._expired(token):
            raise TokenUnavailable(f"the token in {self._path} expired; put a fresh one there")
        return token

    def changed(self) -> bool:
        """Whether the file changed (inode, size, mtime) since `current` last read it. A file
        that cannot be looked at is no change: there is nothing new to read."""
        try:
            info = os.stat(self._path)
        except OSError:
            return False
        return (info.st_ino, info.st_size, info.st_mtime_ns) != self._seen

    def _expired(self, token: Token) -> bool:
        return token.expires_at is not None and token.expires_at <= self._clock.time()


LAST_DATE = 253_402_300_799  # 9999-12-31 23:59:59 UTC: the last second `datetime` can show


# The length of a signature by the algorithms the sink accepts (mqtt_ingest/keys.py): ES256 is
# r and s of 32 bytes each, EdDSA (Ed25519) 64 bytes; RS256 the modulus' length (checked apart).
SIGNATURE_BYTES = {"ES256": 64, "EdDSA": 64}


def _parse_token(
    text: str, path: Path, device_id: str | None = None, audience: str | None = None
) -> Token:
    """The token in ``text``, read without verifying it (the agent has no issuer key), but
    refused if it cannot be the one to send: cut short in its signature (a copy interrupted, a
    full disk: ``header.payload.`` parses), or for another device or audience. The sink would
    refuse it; taken as a fresh token it would replace one still valid."""
    try:
        claims = jwt.decode(text, options={"verify_signature": False})
        algorithm = jwt.get_unverified_header(text).get("alg")
    except jwt.InvalidTokenError as exc:
        raise TokenUnavailable(f"{path} does not hold a JWT: {exc}") from None
    _check_signature(text.rsplit(".", 1)[-1], algorithm, path)
    subject = claims.get("sub")
    if device_id is not None and subject != device_id:
        raise TokenUnavailable(
            f"the token in {path} is for {subject!r}, not this device ({device_id!r})"
        )
    if audience is not None:
        audiences = claims.get("aud")
        if not (audiences == audience or (isinstance(audiences, list) and audience in audiences)):
            raise TokenUnavailable(
                f"the token in {path} is for the audience {audiences!r}, not {audience!r}"
            )
    issued = claims.get("iat")
    if isinstance(issued, bool) or not isinstance(issued, int | float):
        issued = None
    elif not math.isfinite(issued) or not 0 <= issued <= LAST_DATE:
        issued = None  # only shown: the sink judges it
    expires = claims.get("exp")
    if expires is None:
        return Token(text, None, issued)
    # JSON's 1e400 and NaN parse as inf and nan: never expired, and no date to show
    # (`status` and the uplink's log line raised on them).
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise TokenUnavailable(f"the token in {path} has a non-numeric exp")
    if not math.isfinite(expires) or not 0 <= expires <= LAST_DATE:
        raise TokenUnavailable(f"the token in {path} has an exp out of range ({expires})")
    return Token(text, float(expires), None if issued is None else float(issued))


def _check_signature(segment: str, algorithm: object, path: Path) -> None:
    size = len(base64url_decode(segment))  # a valid one: jwt.decode checked it
    if size == 0:
        raise TokenUnavailable(f"the token in {path} has no signature (the file cut short?)")
    if algorithm == "RS256":
        # As long as the key's modulus, of any size (2304 and 3000-bit keys are valid too; a
        # rule of steps of 512 bits refused their every token): 1024 bits at least.
        fits = size >= 128
    else:
        fits = SIGNATURE_BYTES.get(str(algorithm), size) == size
    if not fits:
        raise TokenUnavailable(
            f"the token in {path} has a signature of {size} bytes, wrong for {algorithm}"
            " (the file cut short?)"
        )


class NoToken:
    def current(self) -> Token:
        return Token(None, None)

    def changed(self) -> bool:
        return False


def token_source(config: UplinkConfig, device_id: str, clock: Clock) -> TokenSource:
    settings = config.token
    if settings.mode == "device-signed":
        assert settings.audience is not None  # checked by the config
        return DeviceSignedTokens(
            device_id, config.tls.key, settings.audience, settings.lifetime, clock
        )
    if settings.mode == "token-file":
        assert settings.file is not None  # checked by the config
        return TokenFile(settings.file, clock, device_id=device_id, audience=settings.audience)
    return NoToken()
