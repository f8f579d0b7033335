"""A worker's limits on its callers: at most ``maximum_concurrent_rpcs`` calls at once, and
a per-peer share of its KV sessions (``max_sessions_per_peer``), so one client cannot take
them all, while the coordinator's own batched pipeline keeps working under the defaults."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import QueueFull
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker.grpc_endpoint import concurrent_rpc_limit
from mlx_relay.worker.worker_server import WorkerServer
from tests.support.cluster import local_cluster
from tests.support.tls import make_certs
from tests.support.worker_cluster import entry, running_workers, worker_config

PROMPT = [5, 17, 42, 99, 3, 8]


def prefill(request_id: str) -> pb.ForwardRequest:
    return entry(request_id, 0, encode_token_ids(PROMPT))


async def test_calls_past_maximum_concurrent_rpcs_are_refused(tiny_model_dir: Path) -> None:
    config = worker_config(tiny_model_dir, [(0, 4)], network={"maximum_concurrent_rpcs": 2})
    async with running_workers(config) as (worker,):
        gate = threading.Event()
        # Hold the MLX thread: Forward calls wait for it, in flight.
        blocker = asyncio.create_task(worker.server._executor.run(gate.wait, 30))

        async def call(rid: str) -> pb.ForwardResponse:
            return await worker.stub.Forward(prefill(rid), timeout=30)

        calls = [asyncio.create_task(call(f"r{i}")) for i in range(4)]
        try:
            done: set[asyncio.Task[Any]] = set()
            while len(done) < 2:
                finished, _ = await asyncio.wait(
                    set(calls) - done, timeout=20, return_when=asyncio.FIRST_COMPLETED
                )
                assert finished, "no call was refused while two were in flight"
                done |= finished
            client = WorkerClient("w0", worker.server.address, config.network)
            try:
                with pytest.raises(QueueFull, match=r"network\.maximum_concurrent_rpcs"):
                    await client.forward(prefill("one-more"))
            finally:
                await client.close()
        finally:
            gate.set()
            await blocker
        results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 2, results
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(isinstance(r, pb.ForwardResponse) for r in results if r not in refused)


def test_the_default_rpc_limit_grows_with_the_running_requests(tiny_model_dir: Path) -> None:
    assert concurrent_rpc_limit(worker_config(tiny_model_dir, [(0, 4)])) == 256
    busy = worker_config(tiny_model_dir, [(0, 4)], inference={"max_running_requests": 100})
    assert concurrent_rpc_limit(busy) == 400


async def test_one_peer_gets_only_its_share_of_the_sessions(tiny_model_dir: Path) -> None:
    inference = {"max_running_requests": 1, "max_sessions": 8, "max_sessions_per_peer": 2}
    config = worker_config(tiny_model_dir, [(0, 4)], inference=inference)
    async with running_workers(config) as (worker,):
        for rid in ("a", "b"):
            await worker.stub.Forward(prefill(rid), timeout=30)
        # Another connection from the same address is the same peer.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.WorkerStub(channel).Forward(prefill("c"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_peer" in refused.value.details()
        assert "quota of 2" in refused.value.details()
        assert worker.server.kv_sessions == 2
        await worker.stub.EndSession(pb.EndSessionRequest(request_id="a"), timeout=5)
        await worker.stub.Forward(prefill("c"), timeout=30)
        assert worker.server.kv_sessions == 2


async def test_under_mtls_each_client_certificate_is_its_own_peer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    data = {
        "model": {"path": str(tiny_model_dir)},
        "devices": [
            {"id": "coordinator", "role": "coordinator", "tls": certs.issue("coordinator")},
            {"id": "w0", "port": 0, "layers": [0, 4], "tls": certs.issue("w0")},
        ],
        "network": {**certs.network(require_client_cert=True), "retries": 0},
        "inference": {"max_running_requests": 1, "max_sessions": 8, "max_sessions_per_peer": 2},
    }
    config = ClusterConfig.from_dict(data)
    async with WorkerServer(config, "w0", enable_monitoring=False) as server:
        address = server.address
        greedy = WorkerClient("w0", address, config.network, tls=certs.material("greedy"))
        polite = WorkerClient("w0", address, config.network, tls=certs.material("polite"))
        try:
            for rid in ("g1", "g2"):
                await greedy.forward(prefill(rid))
            with pytest.raises(QueueFull, match="max_sessions_per_peer"):
                await greedy.forward(prefill("g3"))
            for rid in ("p1", "p2"):
                await polite.forward(prefill(rid))
            assert server.kv_sessions == 4
        finally:
            await greedy.close()
            await polite.close()


async def test_the_coordinator_is_not_starved_by_the_default_quota(tiny_model_dir: Path) -> None:
    # Two running requests at a time, many more waiting: finished requests' EndSession
    # overlap the next ones' prefill on every stage.
    inference = {"max_running_requests": 2, "max_sessions": 4, "max_batch_size": 2}
    async with local_cluster(tiny_model_dir, 2, inference=inference) as cluster:
        assert cluster.config.inference.peer_session_quota == 4
        requests = [
            cluster.orchestrator.process_request(
                InferenceRequest(prompt=f"request {i} " * (1 + i % 3), max_tokens=2 + i % 4)
            )
            for i in range(12)
        ]
        responses = await asyncio.gather(*requests)
        assert all(r.finish_reason in ("stop", "length") for r in responses)
        assert sum(w.kv_sessions for w in cluster.workers) == 0
