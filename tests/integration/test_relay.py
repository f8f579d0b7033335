"""Stage-to-stage relay: the coordinator calls only the first stage, each stage calls the
next one itself, and the hops really used show as links (worker -> worker included)."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.proto import relay_pb2, relay_pb2_grpc
from mlx_relay.wire import encode_token_ids
from tests.support.cluster import local_cluster

PROMPT = "Each worker holds a contiguous range of transformer layers"


async def test_three_stages_relay_to_each_other_and_report_their_links(
    tiny_model_dir: Path,
) -> None:
    async with local_cluster(tiny_model_dir, 3, enable_monitoring=True) as cluster:
        orchestrator = cluster.orchestrator
        response = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=5))
        await orchestrator.cluster_monitor.poll_once()
        snapshot = orchestrator.metrics_collector.export_metrics()
    assert set(response.timings.stage_compute) == {"worker-0", "worker-1", "worker-2"}
    assert all(v > 0 for v in response.timings.stage_compute.values())
    links = {(link["device"], link["peer"]): link for link in snapshot["network"]["links"]}
    for hop in [("coordinator", "worker-0"), ("worker-0", "worker-1"), ("worker-1", "worker-2")]:
        assert links[hop]["requests_total"].get("ok", 0) >= 6, hop  # prefill + 5 decode steps
        assert links[hop]["transfer"]["count"] >= 6, hop
        assert links[hop]["transmit_bytes_total"] > 0, hop
    assert ("worker-2", "worker-3") not in links
    forwards = {
        (entry["peer"], entry["method"])
        for entry in snapshot["network"]["rpc"]
        if entry["method"] == "Forward"
    }
    # The coordinator itself sends Forward to the first stage only.
    assert forwards == {("worker-0", "Forward")}
    # Hidden states go worker -> worker; only token ids go back to the coordinator.
    hidden = links[("worker-0", "worker-1")]["transmit_bytes_total"]
    assert hidden > links[("coordinator", "worker-0")]["transmit_bytes_total"]


async def test_a_route_may_name_only_the_next_stage(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 3, initialize=False) as cluster:
        first, _, last = cluster.config.workers
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = relay_pb2_grpc.WorkerStub(channel)
            entry = relay_pb2.ForwardEntry(
                request_id="r", position=0, tensor=encode_token_ids([1, 2, 3])
            )
            route = [relay_pb2.Hop(device_id=last.id, address=last.address)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Forward(relay_pb2.ForwardRequest(entries=[entry], route=route))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "relays only to its next stage 'worker-1'" in (refused.value.details() or "")
