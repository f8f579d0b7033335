"""Certificates made at test time (``trustme``): a CA and one certificate per device, as
files a cluster configuration names."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from mlx_relay.core.tls_config import TLSMaterial


@dataclass
class ClusterCerts:
    """A CA and the files of its device certificates under ``directory``."""

    ca: trustme.CA
    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def network(self, *, require_client_cert: bool = False) -> dict[str, Any]:
        """The ``network`` settings that turn TLS on with this CA."""
        tls = {"ca_file": str(self.ca_file), "require_client_cert": require_client_cert}
        return {"tls": tls}

    def issue(self, name: str, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> dict[str, str]:
        """A certificate for ``name`` (its common name) naming ``hosts``; its ``tls`` entry."""
        issued = self.ca.issue_cert(*hosts, common_name=name)
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(key)
        return {"cert_file": str(cert), "key_file": str(key)}

    def devices(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``devices`` settings giving each of ``ids`` a certificate."""
        return {device_id: {"tls": self.issue(device_id)} for device_id in ids}

    def material(
        self, name: str | None = None, *, trust: ClusterCerts | None = None
    ) -> TLSMaterial:
        """What a client needs: the CA of ``trust`` (default: this one) and, with ``name``,
        a certificate of this CA."""
        ca = (trust or self).ca.cert_pem.bytes()
        if name is None:
            return TLSMaterial(ca, None, None, False)
        files = self.issue(name)
        cert, key = (Path(files[k]).read_bytes() for k in ("cert_file", "key_file"))
        return TLSMaterial(ca, cert, key, False)


def make_certs(directory: Path) -> ClusterCerts:
    """A new CA whose certificate is written to ``directory/ca.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    certs = ClusterCerts(ca, directory)
    ca.cert_pem.write_to_path(certs.ca_file)
    return certs


def cluster_tls(
    directory: Path, num_workers: int, *, require_client_cert: bool = False
) -> tuple[ClusterCerts, dict[str, Any], dict[str, dict[str, Any]]]:
    """Certificates for a ``local_cluster`` of ``num_workers``: the CA, its ``network`` and
    ``devices`` settings (the coordinator and ``worker-0``...)."""
    certs = make_certs(directory)
    ids = ["coordinator", *(f"worker-{i}" for i in range(num_workers))]
    return certs, certs.network(require_client_cert=require_client_cert), certs.devices(ids)
