"""The warning a server bound beyond loopback without a token gives, HTTP and workers alike."""

from __future__ import annotations

from pathlib import Path

from mlx_relay.core.config import ClusterConfig, HTTPConfig
from mlx_relay.core.http_access import exposure_warning as http_warning
from mlx_relay.worker.worker_server import WorkerServer


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
    assert worker("0.0.0.0", "secret")._warn_if_exposed() is None
