"""``mlx-relay certs``: a CA and one certificate per device of a cluster file, for TLS
between devices (``network.tls``), and the configuration lines that turn it on.

Writes ``ca.pem`` and ``ca.key`` (keep the CA key on this machine: it signs certificates),
and ``<device-id>.pem`` / ``<device-id>.key`` for every device. Private keys are written
readable by their owner only (0600). Existing files are never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mlx_relay.cli.cert_authority import issue, make_authority, subject_names
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError

DEFAULT_DAYS = 3650
KEY_MODE = 0o600
CA_NAME = "ca"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "certs",
        help="make a CA and a TLS certificate per device of the cluster",
        description=(
            "Make a certificate authority and one certificate and key per device of the "
            "cluster file (named for the device's host, localhost and 127.0.0.1), and print "
            "the configuration lines that turn on TLS (with client certificates) between "
            "the devices."
        ),
    )
    parser.add_argument("--config", "-c", required=True, help="cluster configuration (YAML)")
    parser.add_argument("--out", "-o", required=True, help="directory to write the files to")
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        help=f"validity of the certificates in days (default: {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace certificates and keys already in --out"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    config = ClusterConfig.from_yaml(args.config)
    if args.days < 1:
        raise ConfigError(f"--days: expected at least 1, got {args.days}")
    if any(d.id == CA_NAME for d in config.devices):
        raise ConfigError(
            f"{config.source}: devices: a device named {CA_NAME!r} would share the CA's files; "
            "rename it"
        )
    out = Path(args.out).absolute()
    existing = [path.name for path in planned_files(config, out) if path.exists()]
    if existing and not args.force:
        raise ConfigError(
            f"--out {out}: {', '.join(existing)} already there; give --force to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = write_certificates(config, out, args.days)
    print("wrote:")
    for path in written:
        print(f"  {path}")
    print()
    print(config_lines(config, out), end="")
    return 0


def planned_files(config: ClusterConfig, out: Path) -> list[Path]:
    """Every file :func:`write_certificates` writes into ``out``."""
    names = [CA_NAME, *(d.id for d in config.devices)]
    return [out / f"{name}.{ext}" for name in names for ext in ("pem", "key")]


def write_certificates(config: ClusterConfig, out: Path, days: int) -> list[Path]:
    """The CA and one certificate per device of ``config``, written into ``out``; returns
    the paths written."""
    authority = make_authority(days)
    written = _write_pair(out, CA_NAME, authority.issued.cert_pem, authority.issued.key_pem)
    for device in config.devices:
        host = device.host if device.role == "worker" else None
        issued = issue(authority, device.id, subject_names(host), days)
        written += _write_pair(out, device.id, issued.cert_pem, issued.key_pem)
    return written


def _write_pair(out: Path, name: str, cert: bytes, key: bytes) -> list[Path]:
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    cert_path.write_bytes(cert)
    _write_private(key_path, key)
    return [cert_path, key_path]


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 whatever the umask, and made 0600 when it already existed (--force).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)


def config_lines(config: ClusterConfig, out: Path) -> str:
    """What to add to the cluster file: ``network.tls`` and each device's ``tls``. Client
    certificates are required when the file has a coordinator entry (its certificate is the
    one the coordinator presents)."""
    mtls = config.coordinator is not None
    why = (
        "workers accept only clients with a certificate from this CA"
        if mtls
        else "true needs a device with role 'coordinator' (then run certs again)"
    )
    lines = [
        "Add to the cluster file (each machine needs ca.pem and its own device's .pem and",
        ".key; ca.key stays here):",
        "",
        "network:",
        "  tls:",
        f"    ca_file: {out / 'ca.pem'}",
        f"    require_client_cert: {'true' if mtls else 'false'}   # {why}",
        "",
        "devices:   # add `tls` to each device's entry",
    ]
    for device in config.devices:
        lines += [
            f"  - id: {device.id}",
            "    tls:",
            f"      cert_file: {out / (device.id + '.pem')}",
            f"      key_file: {out / (device.id + '.key')}",
        ]
    return "\n".join(lines) + "\n"
