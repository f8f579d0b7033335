"""A worker process restarted after a live repartition loads the layers of the config file,
not the ones the pipeline routes to it: a step meant for other layers is refused (never a
wrong token), recovery by replay gives the worker its range back before replaying, and so
does applying the split again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mlx_relay.coordinator.client import StageError
from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.coordinator.requests import TokenEvent
from mlx_relay.core.types import LayerRange
from tests.support.cluster import LocalCluster, process_cluster
from tests.support.reference import cached_tokenizer, reference_tokens

NETWORK = {"request_timeout": 5.0, "connect_timeout": 30.0, "ping_timeout": 1.0}
MOVED = [LayerRange(0, 3), LayerRange(3, 4)]  # the config's auto split is [0, 2) / [2, 4)
MAX_TOKENS = 60


def ids_of(model_dir: Path, prompt: str) -> list[int]:
    return list(cached_tokenizer(model_dir).encode(prompt))


def expected(model_dir: Path, prompt: str) -> list[int]:
    return [t.token_id for t in reference_tokens(model_dir, ids_of(model_dir, prompt), MAX_TOKENS)]


async def restart(cluster: LocalCluster, index: int) -> None:
    cluster.processes[index].kill()
    cluster.processes[index].start()  # as a supervisor would: same port, the file's layers
    await cluster.orchestrator._clients[index].wait_serving(60)


async def served(cluster: LocalCluster) -> list[tuple[int, int]]:
    statuses = [await c.get_status() for c in cluster.orchestrator._clients]
    return [(s.layer_start, s.layer_end) for s in statuses]


async def collect(stream: object, events: list[TokenEvent]) -> None:
    async for event in stream:  # type: ignore[attr-defined]
        events.append(event)


async def test_a_restarted_worker_gets_its_moved_range_back(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with process_cluster(tiny_model_dir, tmp_path, 2, network=NETWORK) as cluster:
        orchestrator = cluster.orchestrator
        result = await orchestrator.repartition(MOVED)
        assert result.before == (LayerRange(0, 2), LayerRange(2, 4)) and result.changed
        assert await served(cluster) == [(0, 3), (3, 4)]

        # Killed mid-stream: the replay waits until the worker has its range back.
        prompt = "Each worker holds a contiguous range of transformer layers"
        events: list[TokenEvent] = []
        request = InferenceRequest(prompt_tokens=ids_of(tiny_model_dir, prompt), max_tokens=60)
        task = asyncio.create_task(collect(orchestrator.stream_request(request), events))
        deadline = time.monotonic() + 60
        while len(events) < 3:
            assert time.monotonic() < deadline, "the stream did not start"
            await asyncio.sleep(0.005)
        at_kill = len(events)
        await restart(cluster, 1)
        await asyncio.wait_for(task, 120)
        assert at_kill < len(events)
        assert [e.token_id for e in events if e.token_id is not None] == expected(
            tiny_model_dir, prompt
        )
        assert await served(cluster) == [(0, 3), (3, 4)]

        # Restarted while idle: the next step is refused, naming the worker and both ranges.
        await restart(cluster, 1)
        assert await served(cluster) == [(0, 3), (2, 4)]
        with pytest.raises(StageError) as refused:
            await orchestrator.process_request(InferenceRequest(prompt="x", max_tokens=4))
        assert refused.value.device_id == "worker-1"
        assert "serves layers [2, 4), the caller expects [3, 4)" in str(refused.value)
        # Applying the split again gives it back.
        again = await orchestrator.repartition(MOVED)
        assert again.before == (LayerRange(0, 3), LayerRange(2, 4)) and again.changed
        assert await served(cluster) == [(0, 3), (3, 4)]
        response = await orchestrator.process_request(
            InferenceRequest(prompt_tokens=ids_of(tiny_model_dir, prompt), max_tokens=MAX_TOKENS)
        )
        assert response.token_ids == expected(tiny_model_dir, prompt)
