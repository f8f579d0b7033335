"""TLS between machines, as the README's recipe has it: ``mlx-relay certs`` for the cluster
file, its printed lines added, two workers on machines (network namespaces) of their own
serving TLS with client certificates, the coordinator outside reaching them over the
bridge. The tokens are those of one process; a plaintext client is refused; the workers,
guarded by client certificates, print no exposure warning.

Needs root (or CAP_NET_ADMIN) and iproute2, as on CI; elsewhere the test skips saying so.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import WorkerUnavailable
from mlx_relay.model.tokenizer import encode_prompt
from mlx_relay.server.runtime import CoordinatorRuntime
from tests.support.cluster import free_ports
from tests.support.multihost import MLX_RELAY, cluster_file, start_worker, wait_for_log
from tests.support.netns import Topology, topology_or_skip
from tests.support.reference import cached_tokenizer, reference_tokens

pytestmark = pytest.mark.timeout(300)

PROMPT = "Distributed inference splits the layers of a model across several devices."


@pytest.fixture(scope="module")
def net() -> Iterator[Topology]:
    with topology_or_skip(2) as net:
        yield net


def with_printed_tls(config_path: Path, printed: str) -> Path:
    """The cluster file with the lines ``mlx-relay certs`` printed added to it."""
    settings: dict[str, Any] = yaml.safe_load(printed[printed.index("\nnetwork:") :])
    data = yaml.safe_load(config_path.read_text())
    data["network"].update(settings["network"])
    tls = {entry["id"]: entry["tls"] for entry in settings["devices"]}
    for device in data["devices"]:
        device["tls"] = tls[device["id"]]
    path = config_path.with_name("tls.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def test_workers_on_other_machines_serve_over_tls_with_client_certificates(
    net: Topology, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    plain = cluster_file(tmp_path / "cluster.yaml", net, tiny_model_dir, port, {"enabled": False})
    certs = subprocess.run(
        [MLX_RELAY, "certs", "--config", str(plain), "--out", str(tmp_path / "certs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert certs.returncode == 0, certs.stderr
    config_path = with_printed_tls(plain, certs.stdout)
    runs = [
        start_worker(host, config_path, f"worker-{i}", tmp_path / f"worker-{i}.log")
        for i, host in enumerate(net.hosts)
    ]
    for run in runs:
        wait_for_log(run, "serving layers")
        assert "binding" not in run.log(), run.log()  # client certificates guard it

    config = ClusterConfig.from_yaml(config_path)
    runtime = CoordinatorRuntime(config, "127.0.0.1", 0, enable_monitoring=False)
    await runtime.start()
    try:
        assert runtime.services is not None
        response = await runtime.services.orchestrator.process_request(
            InferenceRequest(prompt=PROMPT, max_tokens=6)
        )
    finally:
        await runtime.stop()
    ids = encode_prompt(cached_tokenizer(tiny_model_dir), prompt=PROMPT, chat=False)
    assert response.token_ids == [t.token_id for t in reference_tokens(tiny_model_dir, ids, 6)]

    worker = config.workers[0]
    client = WorkerClient(
        worker.id, worker.address, config.network.model_copy(update={"retries": 0})
    )
    try:
        with pytest.raises(WorkerUnavailable):
            await client.ping(timeout=3.0)
    finally:
        await client.close()
