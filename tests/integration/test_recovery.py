"""Recovery by replay on real worker processes: a stage killed mid-generation pauses the
streams instead of failing them; once it serves again every request is replayed and goes on
with no token repeated or missing, greedy output equal to one process's, and no KV session
left behind. Past ``network.recovery_timeout`` the requests fail with the stage's named
error, as without recovery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.coordinator.requests import TokenEvent
from mlx_relay.core.errors import WorkerUnavailable
from mlx_relay.model.sampling import SamplingParams
from tests.support.cluster import LocalCluster, process_cluster
from tests.support.reference import cached_tokenizer, reference_tokens

NETWORK = {"request_timeout": 5.0, "connect_timeout": 30.0, "ping_timeout": 1.0}
PROMPTS = [
    "Each worker holds a contiguous range of transformer layers",
    "The quick brown fox",
    "Hello",
]
MAX_TOKENS = 120


def ids_of(model_dir: Path, prompt: str) -> list[int]:
    return list(cached_tokenizer(model_dir).encode(prompt))


async def kv_sessions(cluster: LocalCluster) -> list[int]:
    clients = cluster.orchestrator._clients
    return [(await c.get_status()).kv_sessions for c in clients]


async def no_sessions_left(cluster: LocalCluster, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (counts := await kv_sessions(cluster)) != [0] * len(counts):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return counts


async def collect(stream: object, events: list[TokenEvent]) -> None:
    async for event in stream:  # type: ignore[attr-defined]
        events.append(event)


@pytest.mark.parametrize(
    ("victim", "chained"),
    [(0, 0), (1, 0), (0, 4)],
    ids=["first-stage", "last-stage", "first-stage-chained-steps"],
)
async def test_a_stage_killed_mid_stream_pauses_the_streams_and_they_go_on(
    tiny_model_dir: Path, tmp_path: Path, victim: int, chained: int
) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    async with process_cluster(
        tiny_model_dir,
        tmp_path,
        2,
        enable_monitoring=True,
        network=NETWORK,
        inference={"chained_steps_max_batch": chained},
    ) as cluster:
        orchestrator = cluster.orchestrator
        requests = [
            InferenceRequest(prompt_tokens=ids_of(tiny_model_dir, p), max_tokens=MAX_TOKENS)
            for p in PROMPTS
        ]
        requests.append(
            InferenceRequest(
                prompt_tokens=ids_of(tiny_model_dir, PROMPTS[0]),
                max_tokens=MAX_TOKENS,
                temperature=seeded.temperature,
                top_p=seeded.top_p,
                seed=seeded.seed,
            )
        )
        events: list[list[TokenEvent]] = [[] for _ in requests]
        tasks = [
            asyncio.create_task(collect(orchestrator.stream_request(r), e))
            for r, e in zip(requests, events, strict=True)
        ]
        deadline = time.monotonic() + 60
        while min(len(e) for e in events) < 3:
            assert time.monotonic() < deadline, "the streams did not start"
            await asyncio.sleep(0.005)
        process = cluster.processes[victim]
        process.kill()
        at_kill = [len(e) for e in events]
        process.start()  # as a supervisor would: same port, layers loaded again
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

        for request, got in zip(requests, events, strict=True):
            assert got[-1].finish_reason is not None
            tokens = [e.token_id for e in got if e.token_id is not None]
            assert [e.index for e in got] == list(range(len(got)))  # none repeated or missing
            params = seeded if request.seed is not None else SamplingParams()
            expected = reference_tokens(
                tiny_model_dir, list(request.prompt_tokens or []), MAX_TOKENS, params
            )
            assert tokens == [t.token_id for t in expected]
        # The kill came mid-generation: the streams had tokens left to produce.
        assert all(n < len(e) for n, e in zip(at_kill, events, strict=True))
        assert await no_sessions_left(cluster) == [0, 0]
        collector = orchestrator.metrics_collector
        assert collector is not None
        inference = collector.snapshot().inference
        recovery = inference.histograms["recovery_seconds"]
        assert recovery.count == len(requests)
        assert inference.latency["recovery"].count == len(requests)
        assert inference.failure_total == {}
        assert orchestrator.running_requests == 0


async def test_past_the_recovery_window_the_requests_fail_naming_the_stage(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    window = 2.0
    network = {**NETWORK, "recovery_timeout": window}
    async with process_cluster(tiny_model_dir, tmp_path, 2, network=network) as cluster:
        orchestrator = cluster.orchestrator
        stream = orchestrator.stream_request(
            InferenceRequest(prompt_tokens=ids_of(tiny_model_dir, PROMPTS[0]), max_tokens=400)
        )
        await anext(stream)
        cluster.processes[1].kill()
        killed_at = time.monotonic()
        with pytest.raises(WorkerUnavailable) as failed:
            async for _ in stream:
                pass
        waited = time.monotonic() - killed_at
        assert failed.value.device_id == "worker-1"
        # It waited for the stage for the whole window, not longer than a poll past it.
        assert window * 0.9 <= waited < window + 3.0
        client = orchestrator._clients[0]
        deadline = time.monotonic() + 10
        while (await client.get_status()).kv_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await client.get_status()).kv_sessions == 0
