"""TLS between devices with certificates made at test time: a TLS cluster (with and without
client certificates) serves the same tokens as one process, over the relay hop too; a
plaintext client, a client certificate of another CA and a coordinator trusting another CA
are refused, with errors that say so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator, InferenceRequest
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import RelayError, WorkerUnavailable
from mlx_relay.model.tokenizer import encode_prompt
from mlx_relay.proto import relay_pb2, relay_pb2_grpc
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker_client import StageError, TLSHandshakeFailed
from tests.support.cluster import local_cluster
from tests.support.reference import cached_tokenizer, reference_tokens
from tests.support.tls import cluster_tls, make_certs

PROMPT = "Each worker holds a contiguous range of transformer layers"


def prompt_ids(model_dir: Path) -> list[int]:
    return encode_prompt(cached_tokenizer(model_dir), prompt=PROMPT, chat=False)


@pytest.mark.parametrize("require_client_cert", [False, True], ids=["tls", "mtls"])
async def test_a_tls_cluster_serves_the_tokens_of_one_process_over_the_relay(
    tiny_model_dir: Path, tmp_path: Path, require_client_cert: bool
) -> None:
    _, network, devices = cluster_tls(tmp_path, 2, require_client_cert=require_client_cert)
    expected = [t.token_id for t in reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir), 8)]
    async with local_cluster(
        tiny_model_dir, 2, network=network, devices=devices, enable_monitoring=True
    ) as cluster:
        orchestrator = cluster.orchestrator
        response = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=8))
        snapshot = orchestrator.metrics_collector.export_metrics()
        assert sum(w.kv_sessions for w in cluster.workers) == 0
        # Under TLS no worker opens a direct link (plain TCP): every call stays on gRPC.
        assert [w.direct_link_port for w in cluster.workers] == [0, 0]
    assert response.token_ids == expected
    # The coordinator called the first stage only: worker-0 relayed to worker-1 itself,
    # over TLS (worker-1 serves nothing else).
    forwards = {e["peer"] for e in snapshot["network"]["rpc"] if e["method"] == "Forward"}
    assert forwards == {"worker-0"}
    assert set(response.timings.stage_compute) == {"worker-0", "worker-1"}


async def test_a_tls_worker_refuses_plaintext_clients(tiny_model_dir: Path, tmp_path: Path) -> None:
    certs, network, devices = cluster_tls(tmp_path, 1)
    async with local_cluster(tiny_model_dir, 1, network=network, devices=devices) as cluster:
        worker = cluster.config.workers[0]
        plain = WorkerClient(
            worker.id,
            worker.address,
            cluster.config.network.model_copy(update={"tls": None, "retries": 0}),
        )
        try:
            with pytest.raises(WorkerUnavailable):
                await plain.ping(timeout=2.0)
        finally:
            await plain.close()
        request = relay_pb2.ForwardRequest(
            entries=[
                relay_pb2.ForwardEntry(request_id="r", position=0, tensor=encode_token_ids([1, 2]))
            ]
        )
        async with grpc.aio.insecure_channel(worker.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await relay_pb2_grpc.WorkerStub(channel).Forward(request, timeout=2.0)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert cluster.workers[0].kv_sessions == 0
        # A client that trusts the CA still gets through.
        secure = WorkerClient(
            worker.id, worker.address, cluster.config.network, tls=certs.material()
        )
        try:
            assert await secure.ping(timeout=5.0) > 0
        finally:
            await secure.close()


async def test_under_mtls_a_client_without_a_certificate_of_the_ca_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    certs, network, devices = cluster_tls(tmp_path / "ca", 1, require_client_cert=True)
    other = make_certs(tmp_path / "other")
    async with local_cluster(tiny_model_dir, 1, network=network, devices=devices) as cluster:
        worker = cluster.config.workers[0]
        settings = cluster.config.network.model_copy(update={"retries": 0})

        async def ping(material: object) -> float:
            client = WorkerClient(worker.id, worker.address, settings, tls=material)  # type: ignore[arg-type]
            try:
                return await client.ping(timeout=3.0)
            finally:
                await client.close()

        # Trusts the worker's CA, but its own certificate comes from another CA.
        with pytest.raises(WorkerUnavailable):
            await ping(other.material("intruder", trust=certs))
        with pytest.raises(WorkerUnavailable):
            await ping(certs.material())  # no client certificate at all
        assert await ping(certs.material("tool")) > 0


async def test_a_coordinator_trusting_another_ca_fails_at_once_naming_tls(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, network, devices = cluster_tls(tmp_path / "ca", 2)
    other = make_certs(tmp_path / "other")
    async with local_cluster(
        tiny_model_dir, 2, network=network, devices=devices, initialize=False
    ) as cluster:
        data = cluster.config.to_dict()
        data["network"]["tls"]["ca_file"] = str(other.ca_file)
        data["network"]["connect_timeout"] = 60.0
        orchestrator = DistributedOrchestrator(
            ClusterConfig.from_dict(data), enable_monitoring=False
        )
        try:
            # Well before connect_timeout: a certificate does not get better by waiting.
            with pytest.raises(RelayError) as failed:
                await asyncio.wait_for(orchestrator.initialize(), timeout=30)
        finally:
            await orchestrator.shutdown()
    message = str(failed.value)
    assert "TLS handshake failed" in message, message
    assert "network.tls.ca_file" in message and "worker-0" in message, message
    assert "after 60 s" not in message


async def test_a_tls_client_of_a_plaintext_worker_is_told_it_does_not_serve_tls(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    async with local_cluster(tiny_model_dir, 1) as cluster:
        worker = cluster.config.workers[0]
        client = WorkerClient(
            worker.id, worker.address, cluster.config.network, tls=certs.material()
        )
        try:
            with pytest.raises(TLSHandshakeFailed, match="does not serve TLS"):
                await client.wait_serving(timeout=30)
        finally:
            await client.close()


async def test_a_worker_certificate_for_another_host_is_refused_naming_why(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    devices = {"worker-0": {"tls": certs.issue("worker-0", hosts=("10.9.9.9",))}}
    async with local_cluster(
        tiny_model_dir, 1, network=certs.network(), devices=devices, initialize=False
    ) as cluster:
        worker = cluster.config.workers[0]
        client = WorkerClient(
            worker.id, worker.address, cluster.config.network, tls=certs.material()
        )
        try:
            with pytest.raises(TLSHandshakeFailed, match="does not name the host"):
                await client.wait_serving(timeout=30)
        finally:
            await client.close()


async def test_the_worker_token_travels_inside_tls(tiny_model_dir: Path, tmp_path: Path) -> None:
    certs, network, devices = cluster_tls(tmp_path, 2)
    network = {**network, "auth_token": "a-worker-token"}
    async with local_cluster(tiny_model_dir, 2, network=network, devices=devices) as cluster:
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt=PROMPT, max_tokens=3)
        )
        assert response.finish_reason in ("stop", "length")
        worker = cluster.config.workers[0]
        settings = cluster.config.network.model_copy(update={"auth_token": None})
        tokenless = WorkerClient(worker.id, worker.address, settings, tls=certs.material())
        try:
            with pytest.raises(StageError, match="UNAUTHENTICATED"):
                await tokenless.get_status()
        finally:
            await tokenless.close()
