"""TLS settings in the cluster file: one-line errors naming the file, the field and what
was expected, and the PEM files read where they are used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.core.tls_config import check_tls_files, tls_material
from mlx_relay.worker.worker_server import WorkerServer
from tests.support.tls import make_certs


def cluster(tmp_path: Path, text: str) -> ClusterConfig:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return ClusterConfig.from_yaml(path)


def tls_cluster(tmp_path: Path, *, require_client_cert: bool = False) -> dict[str, Any]:
    certs = make_certs(tmp_path)
    return {
        "model": {"path": "/nonexistent-model"},
        "devices": [
            {"id": "coordinator", "role": "coordinator", "tls": certs.issue("coordinator")},
            {"id": "w0", "port": 0, "layers": [0, 1], "tls": certs.issue("w0")},
        ],
        "network": certs.network(require_client_cert=require_client_cert),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "devices: [{id: w0, port: 1}]\nnetwork: {tls: {ca_file: ca.pem}}\n",
            "devices[0].tls: expected cert_file and key_file: network.tls is set, so every "
            "worker serves TLS",
        ),
        (
            "devices: [{id: w0, port: 1, tls: {cert_file: a.pem, key_file: a.key}}]\n",
            "network.tls: expected ca_file: devices[0].tls is set, so TLS is on",
        ),
        (
            "devices: [{id: c, role: coordinator}, {id: w0, port: 1, tls: {cert_file: a, "
            "key_file: b}}]\nnetwork: {tls: {ca_file: ca.pem, require_client_cert: true}}\n",
            "devices[0].tls: expected cert_file and key_file: "
            "network.tls.require_client_cert is true, so the coordinator presents a certificate",
        ),
        (
            "devices: [{id: w0, port: 1, tls: {cert_file: a}}]\nnetwork: {tls: {ca_file: c}}\n",
            "devices[0].tls.key_file: required field is missing",
        ),
        (
            "devices: [{id: w0, port: 1}]\ninference: {max_sessions_per_peer: 3}\n",
            "inference.max_sessions_per_peer: expected at least 32 (twice max_running_requests, "
            "at most max_sessions): the coordinator is one peer, got 3",
        ),
        (
            "devices: [{id: w0, port: 1}]\nnetwork: {maximum_concurrent_rpcs: 0}\n",
            "network.maximum_concurrent_rpcs: expected a value >= 1, got 0",
        ),
    ],
)
def test_tls_and_limit_settings_are_checked_in_one_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        cluster(tmp_path, text)
    assert str(error.value) == f"{tmp_path / 'cluster.yaml'}: {expected}"


def test_a_missing_or_wrong_pem_file_is_named_with_its_field(tmp_path: Path) -> None:
    config = cluster(
        tmp_path,
        f"devices: [{{id: w0, port: 1, tls: {{cert_file: {tmp_path}/w0.pem, "
        f"key_file: {tmp_path}/cluster.yaml}}}}]\n"
        f"network: {{tls: {{ca_file: {tmp_path}/ca.pem}}}}\n",
    )
    source = tmp_path / "cluster.yaml"
    with pytest.raises(ConfigError) as missing:
        WorkerServer(config, "w0", enable_monitoring=False)
    assert str(missing.value) == (
        f"{source}: network.tls.ca_file: expected a PEM certificate file, "
        f"{tmp_path}/ca.pem does not exist"
    )
    make_certs(tmp_path)
    with pytest.raises(ConfigError) as no_cert:
        check_tls_files(config)
    assert str(no_cert.value).startswith(f"{source}: devices[0].tls.cert_file: expected a PEM")
    (tmp_path / "w0.pem").write_bytes((tmp_path / "ca.pem").read_bytes())
    with pytest.raises(ConfigError) as not_a_key:
        tls_material(config, "w0")
    assert str(not_a_key.value) == (
        f"{source}: devices[0].tls.key_file: expected a PEM private key file, "
        f"{source} holds no PEM private key"
    )


def test_each_process_reads_its_own_certificate(tmp_path: Path) -> None:
    config = ClusterConfig.from_dict(tls_cluster(tmp_path, require_client_cert=True))
    worker = tls_material(config, "w0")
    coordinator = tls_material(config, "coordinator")
    assert worker is not None and coordinator is not None
    assert worker.require_client_cert and worker.has_identity
    assert worker.cert != coordinator.cert and worker.ca == coordinator.ca
    anonymous = tls_material(config, "dashboard")
    assert anonymous is not None and not anonymous.has_identity
    # The settings survive the copy handed to worker processes.
    again = ClusterConfig.from_dict(config.to_dict())
    assert again.network.tls == config.network.tls and again.devices == config.devices


def test_a_key_that_is_not_the_certificates_is_named(tmp_path: Path) -> None:
    data = tls_cluster(tmp_path)
    other = make_certs(tmp_path / "other").issue("w0")
    data["devices"][1]["tls"]["key_file"] = other["key_file"]
    config = ClusterConfig.from_dict(data, "cluster.yaml")
    with pytest.raises(ConfigError) as error:
        tls_material(config, "w0")
    assert str(error.value) == (
        "cluster.yaml: devices[1].tls.key_file: expected the private key of cert_file's "
        "certificate, not another key"
    )
