"""The warning a server bound beyond loopback without a token gives, HTTP and workers alike."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlx_relay.core.config import ClusterConfig, HTTPConfig
from mlx_relay.core.http_access import exposure_warning as http_warning
from mlx_relay.worker.worker_server import WorkerServer
from tests.support.tls import make_certs


def worker(host: str, token: str | None) -> WorkerServer:
    network = {"auth_token": token} if token else {}
    config = ClusterConfig.from_dict(
        {
            "model": {"path": str(Path("/nonexistent-model"))},
            "devices": [{"id": "w0", "host": host, "port": 0, "layers": [0, 1]}],
            "network": network,
        }
    )
    return WorkerServer(config, "w0", enable_monitoring=False)


def test_worker_warns_like_http_when_exposed_without_a_token() -> None:
    message = worker("0.0.0.0", None)._warn_if_exposed()
    assert message is not None
    assert message.startswith("binding 0.0.0.0 with no auth token: anyone who can reach")
    assert "network.auth_token" in message and message.endswith("or bind 127.0.0.1.")
    http = http_warning("0.0.0.0", HTTPConfig())
    assert http is not None and http.split(":")[0] == message.split(":")[0]


def test_worker_on_loopback_or_with_a_token_does_not_warn() -> None:
    assert worker("127.0.0.1", None)._warn_if_exposed() is None
    assert worker("::1", None)._warn_if_exposed() is None


def tls_worker(tmp_path: Path, host: str, *, mtls: bool, token: str | None = None) -> WorkerServer:
    certs = make_certs(tmp_path)
    network: dict[str, object] = certs.network(require_client_cert=mtls)
    if token:
        network["auth_token"] = token
    config = ClusterConfig.from_dict(
        {
            "model": {"path": str(Path("/nonexistent-model"))},
            "devices": [
                {"id": "coordinator", "role": "coordinator", "tls": certs.issue("coordinator")},
                {"id": "w0", "host": host, "port": 0, "layers": [0, 1], "tls": certs.issue("w0")},
            ],
            "network": network,
        }
    )
    return WorkerServer(config, "w0", enable_monitoring=False)


def test_the_warning_is_logged_and_names_tls_when_neither_guards_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="mlx_relay.worker.worker_server"):
        message = worker("0.0.0.0", None)._warn_if_exposed()
    assert message is not None and "(gRPC, unencrypted)" in message
    assert "network.tls (see `mlx-relay certs`)" in message
    assert [r.getMessage() for r in caplog.records] == [message]


def test_tls_without_client_certificates_or_a_token_still_warns(tmp_path: Path) -> None:
    message = tls_worker(tmp_path, "0.0.0.0", mtls=False)._warn_if_exposed()
    assert message is not None and message.startswith("binding 0.0.0.0 with no auth token")
    assert "(gRPC, TLS)" in message and "network.tls" not in message


def test_client_certificates_guard_a_tls_worker(tmp_path: Path) -> None:
    assert tls_worker(tmp_path, "0.0.0.0", mtls=True)._warn_if_exposed() is None
    assert tls_worker(tmp_path, "0.0.0.0", mtls=False, token="s")._warn_if_exposed() is None


def test_a_token_without_tls_warns_that_it_travels_unencrypted() -> None:
    message = worker("0.0.0.0", "secret")._warn_if_exposed()
    assert message is not None and "without TLS" in message and "unencrypted" in message
    assert "secret" not in message
    assert worker("127.0.0.1", "secret")._warn_if_exposed() is None
