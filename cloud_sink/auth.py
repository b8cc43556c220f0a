"""Who is connecting: the verified client certificate, and a JWT bound to it (SPEC §6, P5).

`JwtAuthenticator` is the ingest server's `Authenticator` for the sink. The device id comes from
the certificate TLS verified on this connection (CN, or the ``urn:device:`` SAN URI), never from
what the client says; the MQTT client id and the user name (before any ``?params``) must equal it.
The password is a JWT, checked in one of two modes:

- ``device-signed``: signed with the device's own key; verified with the public key of the
  certificate on this very connection, so token and certificate are bound by construction.
- ``issuer-signed``: signed by a trusted issuer (keys by ``kid``), carrying
  ``cnf: {"x5t#S256": ...}`` (RFC 8705), which must be the thumbprint of the presented certificate.

The algorithm is pinned to the key type (ES256 for P-256, RS256 for RSA, EdDSA for Ed25519): no
``none``, no HMAC, no algorithm the header chooses. Times are checked with the injected clock and
a leeway. A device-signed token is minted for the connection it is presented on, so its ``iat``
must also be recent (within the leeway): a device whose clock is behind is refused at CONNECT
rather than cut at ``exp`` before it renews (RELIABILITY F11). Every refusal has its own reason
(log, metrics) and a CONNACK code.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from cloud_sink.tls import Revocations, certificate_key
from mqtt_ingest import ConnackCode, ConnectRequest, Identity, Refusal
from mqtt_ingest.clock import Clock, SystemClock
from mqtt_ingest.envelope import BATCH_FORMATS, parse_username
from mqtt_ingest.identity import cn_identity, san_uri_identity
from mqtt_ingest.ids import InvalidIdentifier, validate_device_id
from mqtt_ingest.keys import PublicKey, algorithm_for

__all__ = [
    "AuthSettings",
    "JwtAuthenticator",
    "PublicKey",
    "algorithm_for",
    "thumbprint",
]

BAD_TOKEN = ConnackCode.BAD_USERNAME_OR_PASSWORD
FORMATS = frozenset({"raw", *BATCH_FORMATS})


@dataclass(frozen=True)
class AuthSettings:
    audience: str
    mode: Literal["device-signed", "issuer-signed"] = "device-signed"
    issuer: str | None = None
    issuer_keys: Mapping[str, PublicKey] = field(default_factory=dict)
    leeway: float = 30.0
    max_lifetime: float = 3600.0
    identity_source: Literal["cn", "san-uri"] = "cn"
    deny: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.mode == "issuer-signed" and (not self.issuer or not self.issuer_keys):
            raise ValueError("issuer-signed mode needs an issuer and at least one issuer key")


def thumbprint(certificate_der: bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url (no padding) of the SHA-256 of the DER certificate."""
    digest = hashlib.sha256(certificate_der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _finite_number(value: object) -> bool:
    """A JSON number that is finite as a float. PyJWT's JSON parser accepts NaN and Infinity,
    and every comparison with NaN is false: a token with ``iat`` NaN would pass the lifetime
    check (fail open). Strings ("nan" for float()), booleans and 10**400 are refused too."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float
        return False


class _Refused(Exception):
    def __init__(
        self, reason: str, code: ConnackCode = BAD_TOKEN, *, label: str | None = None
    ) -> None:
        super().__init__(reason)
        self.refusal = Refusal(reason, code, label)


class JwtAuthenticator:
    """``revocations``: what the CRL in use revokes. The TLS handshake checked the certificate
    against the CRL of its moment; one reloaded between the handshake and the CONNECT is
    checked here (the sink's revalidation at the reload sees only authenticated connections)."""

    def __init__(
        self,
        settings: AuthSettings,
        clock: Clock | None = None,
        *,
        revocations: Callable[[], Revocations] | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self._revocations = revocations

    async def authenticate(self, request: ConnectRequest) -> Identity | Refusal:
        """The device's identity, or a `Refusal` with its reason. Not logged here: the
        connection logs each refused CONNECT once, with that reason (RELIABILITY F11)."""
        return self.check(request)

    def check(self, request: ConnectRequest, *, again: bool = False) -> Identity | Refusal:
        """`authenticate`, at once: also what the sink judges an open connection with again
        (the request it authenticated with) when these settings are replaced: ``again=True``
        then, which leaves out the rule that a device-signed token was issued just now (it was,
        when the connection was opened; it has aged since, the connection stays)."""
        try:
            identity = self._check(request, again=again)
        except _Refused as refused:
            return refused.refusal
        return identity

    def _check(self, request: ConnectRequest, *, again: bool) -> Identity:
        if request.peer_certificate is None:
            raise _Refused("no client certificate", ConnackCode.NOT_AUTHORIZED)
        certificate = x509.load_der_x509_certificate(request.peer_certificate)
        if self._revocations is not None and certificate_key(certificate) in self._revocations():
            raise _Refused(
                "certificate revoked (by a CRL loaded after the TLS handshake)",
                ConnackCode.NOT_AUTHORIZED,
                label="certificate revoked",
            )
        device = self._device_id(certificate)
        if device in self.settings.deny:
            raise _Refused("device is on the deny list", ConnackCode.NOT_AUTHORIZED)
        if request.client_id != device:
            raise _Refused(
                "client id does not match the certificate", ConnackCode.IDENTIFIER_REJECTED
            )
        if request.username is None:
            raise _Refused("no user name")
        try:
            name, params = parse_username(request.username)
        except ValueError as exc:
            raise _Refused(
                f"bad connection parameters: {exc}", label="bad connection parameters"
            ) from None
        if name != device:
            raise _Refused("user name does not match the certificate")
        if params.get("format", "raw") not in FORMATS:
            raise _Refused(f"unsupported format {params['format']!r}", label="unsupported format")
        if not request.password:
            raise _Refused("no token")
        claims = self._verify(request.password, certificate, again=again)
        if claims.get("sub") != device:
            raise _Refused("token sub does not match the certificate")
        # The connection ends with its token or with its certificate, whichever ends first: a
        # token outliving the certificate kept a connection up to max_lifetime past the end.
        not_after = certificate.not_valid_after_utc.timestamp()
        if not_after <= self.clock.time():
            raise _Refused("certificate expired", ConnackCode.NOT_AUTHORIZED)
        expires_at = min(float(claims["exp"]) + self.settings.leeway, not_after)
        return Identity(device, params, expires_at)

    def _device_id(self, certificate: x509.Certificate) -> str:
        if self.settings.identity_source == "cn":
            raw = cn_identity(certificate)
        else:
            raw = san_uri_identity(certificate)
        try:
            return validate_device_id(raw)
        except InvalidIdentifier as exc:
            raise _Refused(
                f"certificate identity: {exc.reason}",
                ConnackCode.NOT_AUTHORIZED,
                label="certificate identity invalid",
            ) from None

    def _verify(
        self, password: bytes, certificate: x509.Certificate, *, again: bool
    ) -> dict[str, Any]:
        try:
            token = password.decode("ascii")
            header = jwt.get_unverified_header(token)
        except (UnicodeDecodeError, jwt.InvalidTokenError):
            # InvalidTokenError, not only DecodeError: a non-string kid or an unknown crit
            # header raise the parent class.
            raise _Refused("malformed token") from None
        settings = self.settings
        if settings.mode == "device-signed":
            try:
                key = certificate.public_key()
            except (UnsupportedAlgorithm, ValueError):  # an EC curve cryptography lacks
                raise _Refused("certificate key type not supported") from None
            if not isinstance(key, PublicKey):
                raise _Refused("certificate key type not supported")
        else:
            kid = header.get("kid")
            if not isinstance(kid, str) or kid not in settings.issuer_keys:
                raise _Refused("unknown kid")
            key = settings.issuer_keys[kid]
        try:
            algorithm = algorithm_for(key)
        except ValueError as exc:
            raise _Refused(str(exc)) from None
        if header.get("alg") != algorithm:
            raise _Refused(
                f"algorithm {header.get('alg')!r} not allowed for this key",
                label="algorithm not allowed",
            )
        required = ["exp", "iat", "sub", "aud"] + (
            ["iss"] if settings.mode == "issuer-signed" else []
        )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer if settings.mode == "issuer-signed" else None,
                # Times are checked below with our clock (a seam the tests control).
                options={
                    "require": required,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise _Refused(f"token without {exc.claim}") from None
        except jwt.InvalidAudienceError:
            raise _Refused("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _Refused("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise _Refused("bad signature") from None
        except jwt.PyJWTError as exc:
            raise _Refused(f"invalid token: {exc}", label="invalid token") from None
        self._check_times(claims, minted_now=settings.mode == "device-signed" and not again)
        if settings.mode == "issuer-signed":
            confirmation = claims.get("cnf")
            expected = thumbprint(certificate.public_bytes(Encoding.DER))
            if not isinstance(confirmation, dict) or "x5t#S256" not in confirmation:
                raise _Refused("token without cnf x5t#S256")
            if confirmation["x5t#S256"] != expected:
                raise _Refused("token bound to another certificate")
        return claims

    def _check_times(self, claims: dict[str, Any], *, minted_now: bool) -> None:
        """``minted_now``: the token was minted for this CONNECT (device-signed), so its ``iat``
        is the device's clock now. One older than the leeway is a device clock behind ours: the
        device plans its renewal by ``exp`` on its clock, we close at ``exp + leeway`` on ours,
        and once it is behind by more than ``renew_before + leeway`` we would cut every
        connection before it renews. Refused at CONNECT instead, saying why (RELIABILITY F11).
        JWT times are whole seconds (the agent truncates): a token minted this very second can
        look up to one second older, hence the extra second."""
        now = self.clock.time()
        leeway = self.settings.leeway
        times = [claims["exp"], claims["iat"], claims.get("nbf", claims["iat"])]
        if not all(map(_finite_number, times)):
            raise _Refused("token times are not finite numbers")
        exp, iat, nbf = (float(t) for t in times)
        if exp + leeway <= now:
            raise _Refused("token expired")
        if iat - leeway > now or nbf - leeway > now:
            raise _Refused("token not valid yet")
        if minted_now and now - iat > leeway + 1:
            raise _Refused(
                f"token issued {int(now - iat)}s ago: the device clock is behind?",
                label="token issued too long ago",
            )
        if exp - iat > self.settings.max_lifetime:
            lifetime, limit = exp - iat, self.settings.max_lifetime
            raise _Refused(
                f"token lifetime {lifetime:.0f}s over the maximum {limit:.0f}s",
                label="token lifetime over the maximum",
            )
