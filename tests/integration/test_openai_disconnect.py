"""A client that leaves before its answer ends its request: every stage frees the request's KV
cache (checked through each worker's GetStatus) and the coordinator counts it as aborted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from mlx_relay.coordinator.client import WorkerClient
from tests.integration.test_openai_api import Served, serve_cluster

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TOKENS = 400


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(tiny_model_dir: Path) -> AsyncIterator[Served]:
    async with serve_cluster(tiny_model_dir, enable_monitoring=True) as served:
        yield served


async def kv_sessions(served: Served) -> list[int]:
    """Each worker's live KV sessions, as its GetStatus reports them."""
    counts = []
    for worker in served.cluster.config.workers:
        client = WorkerClient(worker.id, worker.address, served.cluster.config.network)
        try:
            counts.append((await client.get_status()).kv_sessions)
        finally:
            await client.close()
    return counts


async def wait_for_sessions(served: Served, expected: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (counts := await kv_sessions(served)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"KV sessions per worker: {counts}, expected {expected}")
        await asyncio.sleep(0.05)


def finished(served: Served) -> dict[str, int]:
    collector = served.cluster.orchestrator.metrics_collector
    assert collector is not None
    return dict(collector.get_inference_metrics()["success_total"])


def long_chat(served: Served, *, stream: bool) -> dict[str, object]:
    return {
        "model": served.model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


async def test_closing_a_stream_frees_every_stage(served: Served) -> None:
    aborted_before = finished(served)["abort"]
    async with (
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=long_chat(served, stream=True)
        ) as response,
    ):
        assert response.status_code == 200
        events = response.aiter_lines()
        received = []
        while len(received) < 3:
            line = await anext(events)
            if line.startswith("data: "):
                received.append(json.loads(line.removeprefix("data: ")))
        assert all(e["object"] == "chat.completion.chunk" for e in received)
        # Mid-generation: the request holds a KV cache on both stages.
        assert await kv_sessions(served) == [1, 1]
        # Leaving the `async with` closes the connection after three chunks.
    await wait_for_sessions(served, [0, 0])
    assert served.cluster.orchestrator.running_requests == 0
    assert finished(served)["abort"] == aborted_before + 1
    generated = served.cluster.orchestrator.metrics_collector.get_inference_metrics()
    assert generated["generation_tokens_total"] < MAX_TOKENS


async def test_leaving_before_a_whole_answer_frees_every_stage(served: Served) -> None:
    aborted_before = finished(served)["abort"]
    async with httpx.AsyncClient(base_url=served.url) as client:
        request = asyncio.create_task(
            client.post("/v1/chat/completions", json=long_chat(served, stream=False))
        )
        await wait_for_sessions(served, [1, 1])  # generating
        request.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for_sessions(served, [0, 0])
    assert served.cluster.orchestrator.running_requests == 0
    assert finished(served)["abort"] == aborted_before + 1
