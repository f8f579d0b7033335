"""``mlx-relay up`` on a TLS cluster file: its worker processes serve TLS with client
certificates and the pipeline answers; a missing certificate stops it before anything
starts, in one line naming the user's file."""

from __future__ import annotations

import signal
from pathlib import Path

import yaml

from tests.integration.test_up_cli import (
    complete,
    exit_code_and_output,
    reap,
    start,
    stop,
    wait_healthy,
)
from tests.support.cluster import cluster_dict, free_ports
from tests.support.tls import cluster_tls


def tls_cluster_file(model_dir: Path, directory: Path) -> tuple[Path, int]:
    http_port, *worker_ports = free_ports(3)
    _, network, devices = cluster_tls(directory / "certs", 2, require_client_cert=True)
    data = cluster_dict(
        model_dir,
        2,
        ports=worker_ports,
        network=network,
        devices=devices,
        http={"port": http_port},
        monitoring={"enabled": False},
    )
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, http_port


def test_up_serves_a_tls_cluster_with_client_certificates(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config, port = tls_cluster_file(tiny_model_dir, tmp_path)
    log = tmp_path / "up.log"
    up = start(["up", "--config", str(config)], log)
    try:
        wait_healthy(up, f"http://127.0.0.1:{port}", log)
        reply = complete(port, "hello", 4)
        assert reply.status_code == 200, reply.text
        assert stop(up, signal.SIGINT, log) == 0
    finally:
        reap(up)


def test_up_names_a_missing_certificate_in_the_users_file(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config, _ = tls_cluster_file(tiny_model_dir, tmp_path)
    (tmp_path / "certs" / "worker-1.pem").unlink()
    log = tmp_path / "up.log"
    code, output = exit_code_and_output(start(["up", "--config", str(config)], log), log)
    assert code == 2, output
    assert (
        f"mlx-relay up: error: {config}: devices[2].tls.cert_file: expected a PEM certificate "
        f"file, {tmp_path / 'certs' / 'worker-1.pem'} does not exist"
    ) in output
