"""A small certificate authority for a home cluster: one CA, one certificate per device.

Keys are ECDSA P-256. A device's certificate names its host (an IP address or a DNS name)
plus ``localhost``, ``127.0.0.1`` and ``::1`` as subject alternative names, and serves both
as a server certificate (a worker's) and as a client certificate (mTLS: the coordinator's,
and a worker's when it relays to the next stage).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "mlx-relay cluster"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# Hosts a server binds to but nobody connects to: never a certificate's name.
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Authority:
    """The CA: its certificate and key (to sign device certificates)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def issued(self) -> Issued:
        return Issued(self.cert.public_bytes(serialization.Encoding.PEM), _key_pem(self.key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    # A little slack for clocks of other machines that run slightly behind.
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def _key_usage(*, authority: bool) -> x509.KeyUsage:
    """A CA signs certificates; a device signs its handshakes and agrees on keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not authority,
        key_cert_sign=authority,
        crl_sign=authority,
        encipher_only=False,
        decipher_only=False,
    )


def make_authority(days: int, common_name: str = "mlx-relay cluster CA") -> Authority:
    """A new self-signed CA, valid ``days`` days, that may sign device certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(authority=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def subject_names(host: str | None) -> list[str]:
    """The names a device's certificate carries: its host (unless a wildcard bind address)
    and the local names, without repeats."""
    names = [host] if host is not None and host.strip("[]") not in _WILDCARDS else []
    names = [n.strip("[]") for n in names]
    return list(dict.fromkeys([*names, *LOCAL_NAMES]))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(authority: Authority, device_id: str, names: list[str], days: int) -> Issued:
    """A certificate for ``device_id`` (its common name) naming ``names``, signed by
    ``authority``, for TLS servers and clients alike."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    ca_key_id = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(device_id))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(authority=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id.value),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
