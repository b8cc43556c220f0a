"""What the PKI's certificates contain (SPEC §8): the CA's, and the leaf profile of server and
device certificates. Names and validity are checked by the caller (`certs.pki`)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from certs.keys import PrivateKey, signing_hash

__all__ = ["ca_certificate", "leaf_certificate"]


def _key_usage(*, ca: bool, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def ca_certificate(
    name: x509.Name, key: PrivateKey, start: dt.datetime, end: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate that signs leaves only (path length 0)."""
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True, key_encipherment=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, signing_hash(key))
    )


def leaf_certificate(
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    authority_key_identifier: x509.AuthorityKeyIdentifier,
    public: CertificatePublicKeyTypes,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    key_encipherment: bool,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.Certificate:
    """A server or device certificate: CN, SANs, one extended key usage, signed by ``issuer``."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, key_encipherment=key_encipherment), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(authority_key_identifier, critical=False)
        .sign(issuer_key, signing_hash(issuer_key))
    )
