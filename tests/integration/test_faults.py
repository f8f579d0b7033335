"""Worker failures with recovery off (``network.recovery_timeout: 0``): a dead or stuck stage
fails its requests within the deadline, naming the device; the coordinator serves again by
itself once the worker is back on the same port. With recovery on, see test_recovery.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mlx_relay.coordinator.client import WorkerTimedOut
from mlx_relay.coordinator.orchestrator import (
    DistributedOrchestrator,
    InferenceRequest,
    WorkersUnreachable,
)
from mlx_relay.coordinator.requests import TokenEvent
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import WorkerUnavailable
from mlx_relay.worker.worker_server import WorkerServer
from tests.support.cluster import LocalCluster, cluster_dict, free_ports, process_cluster

REQUEST_TIMEOUT = 3.0
# Allowed on top of the deadline for the error to reach the caller on a loaded 2-core machine.
SLACK = 3.0
NETWORK = {
    "request_timeout": REQUEST_TIMEOUT,
    "connect_timeout": 30.0,
    "ping_timeout": 1.0,
    "recovery_timeout": 0,
}
PROMPT = "Each worker holds a contiguous range of transformer layers"


async def wait_all_serving(cluster: LocalCluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = await cluster.orchestrator.stage_health()
        if all(state == "SERVING" for _, state in states):
            return
        assert time.monotonic() < deadline, f"stages not serving: {states}"
        await asyncio.sleep(0.1)


async def drain(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in stream]


async def test_killed_worker_fails_its_requests_then_recovers_after_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with process_cluster(tiny_model_dir, tmp_path, 2, network=NETWORK) as cluster:
        orchestrator = cluster.orchestrator
        before = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=8))

        # Two requests mid-generation; one keeps streaming while the worker dies under it.
        first = orchestrator.stream_request(InferenceRequest(prompt=PROMPT, max_tokens=400))
        second = orchestrator.stream_request(InferenceRequest(prompt="The quick", max_tokens=400))
        await anext(first)
        # The second request is paused after its first token, before any step of the dead
        # worker can answer its next one.
        assert (await anext(second)).finish_reason is None
        progressed = asyncio.Event()

        async def consume_first() -> None:
            async for _ in first:
                progressed.set()

        streaming = asyncio.create_task(consume_first())
        await asyncio.wait_for(progressed.wait(), 30)
        victim = cluster.processes[1]
        victim.kill()
        killed_at = time.monotonic()

        with pytest.raises(WorkerUnavailable) as failed:
            await streaming
        assert failed.value.device_id == "worker-1"
        assert "worker-1" in str(failed.value)
        assert time.monotonic() - killed_at < REQUEST_TIMEOUT + SLACK

        # The paused request does not hang either: its next step fails promptly, naming the
        # dead worker.
        started = time.monotonic()
        with pytest.raises(WorkerUnavailable) as paused:
            await drain(second)
        assert paused.value.device_id == "worker-1"
        assert time.monotonic() - started < REQUEST_TIMEOUT + SLACK

        # Same worker, same port, same coordinator: requests work again.
        victim.start()
        await victim.wait_serving(cluster.config)
        await wait_all_serving(cluster)
        after = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=8))
        assert after.token_ids == before.token_ids
        assert orchestrator.running_requests == 0


@pytest.mark.parametrize("stuck_stage", [0, 1], ids=["first-stage", "downstream-stage"])
async def test_stuck_worker_hits_the_deadline_and_recovers(
    tiny_model_dir: Path, tmp_path: Path, stuck_stage: int
) -> None:
    # worker-0 relays to worker-1 itself: its hop's deadline is what the coordinator's call
    # has left, less a margin, so a stuck worker-1 is named before the coordinator's own
    # deadline would blame worker-0.
    async with process_cluster(tiny_model_dir, tmp_path, 2, network=NETWORK) as cluster:
        orchestrator = cluster.orchestrator
        before = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=6))
        stuck = cluster.processes[stuck_stage]
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            # Four requests batched into the stuck stage's micro-batches all fail at once.
            outcomes = await asyncio.gather(
                *(
                    orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=6))
                    for _ in range(4)
                ),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
        for failed in outcomes:
            assert isinstance(failed, WorkerTimedOut), failed
            assert failed.device_id == f"worker-{stuck_stage}"
            assert "no answer to Forward within" in str(failed)
            if stuck_stage == 0:
                assert f"within {REQUEST_TIMEOUT:g} s" in str(failed)
        assert REQUEST_TIMEOUT * 0.8 <= elapsed < REQUEST_TIMEOUT + SLACK
        await wait_all_serving(cluster)
        after = await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=6))
        assert after.token_ids == before.token_ids


async def test_initialize_lists_every_unreachable_worker(tiny_model_dir: Path) -> None:
    missing_port = free_ports(1)[0]
    data = cluster_dict(tiny_model_dir, 3, network={"connect_timeout": 1.0})
    data["devices"][2]["port"] = missing_port
    data["devices"][3]["port"] = missing_port + 1 if missing_port < 65535 else missing_port - 1
    config = ClusterConfig.from_dict(data)
    server = WorkerServer(config, "worker-0", enable_monitoring=False)
    await server.start(wait=True)
    try:
        config = config.with_worker_ports({"worker-0": server.port})
        orchestrator = DistributedOrchestrator(config, enable_monitoring=False)
        started = time.monotonic()
        with pytest.raises(WorkersUnreachable) as failed:
            await orchestrator.initialize()
        assert time.monotonic() - started < 1.0 + SLACK
        await orchestrator.shutdown()
    finally:
        await server.stop(grace=0)
    listed = {device for device, _, _ in failed.value.failures}
    assert listed == {"worker-1", "worker-2"}
    message = str(failed.value)
    assert message.startswith("2 of 3 workers unreachable")
    assert f"worker-1 at 127.0.0.1:{missing_port}" in message
    assert "worker-0" not in message
    assert isinstance(failed.value, WorkerUnavailable)
