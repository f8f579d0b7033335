"""TLS between devices: the ``network.tls`` section and each device's ``tls`` entry, and the
PEM files they name, read at the one place that uses them.

A cluster either runs every gRPC link over TLS or none: with ``network.tls`` set, every
worker serves TLS with its own certificate and key (``devices[i].tls``), and every client
(the coordinator, a stage relaying to the next one, the dashboard) verifies the worker's
certificate against ``network.tls.ca_file``. With ``require_client_cert`` a worker also
requires and verifies a client certificate from that CA (mutual TLS): the coordinator
presents its device entry's certificate, a relaying worker its own. Paths are read as
given (relative ones from the working directory); ``mlx-relay certs`` prints absolute ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_relay.core.errors import ConfigError
from mlx_relay.core.validation import ConfigSection

if TYPE_CHECKING:
    from mlx_relay.core.config import ClusterConfig

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"


class TLSConfig(ConfigSection):
    """``network.tls``: the CA every client verifies workers against, and whether workers
    require a client certificate signed by it (mTLS)."""

    ca_file: str
    require_client_cert: bool = False


class DeviceTLS(ConfigSection):
    """``devices[i].tls``: the device's certificate (PEM, its chain) and private key: a
    worker serves with it; the coordinator and relaying workers present it as their client
    certificate."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class TLSMaterial:
    """The PEM bytes one process needs: the CA, and its own certificate and key (None for
    a process whose device has no ``tls`` entry: a client without a certificate)."""

    ca: bytes
    cert: bytes | None
    key: bytes | None
    require_client_cert: bool

    @property
    def has_identity(self) -> bool:
        return self.cert is not None and self.key is not None


def tls_material(config: ClusterConfig, device_id: str | None) -> TLSMaterial | None:
    """What the process of ``device_id`` needs for TLS, read from disk; None without
    ``network.tls``. A device id the config does not name (a coordinator with no device
    entry) gets the CA alone.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, in the configuration's
            one-line form (``FILE: network.tls.ca_file: expected ...``).
    """
    tls = config.network.tls
    if tls is None:
        return None
    source = config.source
    ca = read_pem(tls.ca_file, source, "network.tls.ca_file", _CERTIFICATE, "certificate")
    index = next((i for i, d in enumerate(config.devices) if d.id == device_id), None)
    device_tls = config.devices[index].tls if index is not None else None
    if device_tls is None:
        return TLSMaterial(ca, None, None, tls.require_client_cert)
    where = f"devices[{index}].tls"
    cert = read_pem(device_tls.cert_file, source, f"{where}.cert_file", _CERTIFICATE, "certificate")
    key = read_pem(device_tls.key_file, source, f"{where}.key_file", _PRIVATE_KEY, "private key")
    problem = pair_problem(cert, key)
    if problem is not None:
        raise ConfigError(f"{source}: {where}.key_file: expected {problem}")
    return TLSMaterial(ca, cert, key, tls.require_client_cert)


def pair_problem(cert: bytes, key: bytes) -> str | None:
    """What is wrong with a certificate and key that should belong together, or None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert)
    except ValueError:
        return "a key for cert_file, whose certificate cannot be read"
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        return f"an unencrypted PEM private key ({exc})"
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != certificate.public_key().public_bytes(*raw):
        return "the private key of cert_file's certificate, not another key"
    return None


def check_tls_files(config: ClusterConfig) -> None:
    """Read every device's TLS files once (a command that starts the whole cluster on this
    machine checks them before anything starts).

    Raises:
        ConfigError: as :func:`tls_material`.
    """
    for device in config.devices:
        tls_material(config, device.id)


def read_pem(path: str, source: str, where: str, marker: bytes, what: str) -> bytes:
    """The bytes of a PEM file that holds a ``what`` (``marker`` is in its armour).

    Raises:
        ConfigError: ``SOURCE: WHERE: expected a PEM <what> file, ...``.
    """
    expected = f"{source}: {where}: expected a PEM {what} file"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{expected}, {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{expected}, cannot read {path} ({exc.strerror})") from None
    if marker not in data:
        raise ConfigError(f"{expected}, {path} holds no PEM {what}")
    return data
