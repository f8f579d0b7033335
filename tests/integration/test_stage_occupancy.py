"""Per-stage batch size, micro-batches in flight and the bubble, read from the monitoring API
and from ``/metrics`` while concurrent requests run through a real 2-worker pipeline."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from mlx_relay.coordinator.requests import InferenceRequest
from mlx_relay.monitoring.api.views import StatsResponse
from mlx_relay.monitoring.snapshot import Snapshot
from tests.support.cluster import local_cluster
from tests.support.dashboard_cluster import PROMPT_MARKER, dashboard_cluster

CONCURRENT = 8
MAX_TOKENS = 48
IN_FLIGHT = re.compile(
    r'^mlxrelay_stage_microbatches_in_flight\{device="(worker-\d)",stage="(\d)"\} (\S+)$', re.M
)
BUBBLE = re.compile(
    r'^mlxrelay_stage_bubble_ratio\{device="(worker-\d)",stage="(\d)"\} (\S+)$', re.M
)


async def test_api_and_metrics_show_batches_and_micro_batches_in_flight(
    tiny_model_dir: Path,
) -> None:
    async with (
        dashboard_cluster(tiny_model_dir) as env,
        httpx.AsyncClient(base_url=env.url, timeout=10) as http,
    ):
        orchestrator = env.cluster.orchestrator

        async def one(i: int) -> int:
            request = InferenceRequest(prompt=f"{PROMPT_MARKER} {i}", max_tokens=MAX_TOKENS)
            response = await orchestrator.process_request(request)
            return response.usage.completion_tokens

        runs = asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        largest_batch: dict[str, int] = {}
        in_flight_api: dict[str, int] = {}
        in_flight_metrics: dict[str, float] = {}
        bubbles: list[float] = []
        while not runs.done():
            snapshot = Snapshot.model_validate((await http.get("/api/metrics")).json())
            for device_id, occupancy in snapshot.occupancy.items():
                if occupancy.batch_size_last is not None:
                    largest_batch[device_id] = max(
                        largest_batch.get(device_id, 0), occupancy.batch_size_last
                    )
                in_flight_api[device_id] = max(
                    in_flight_api.get(device_id, 0), occupancy.microbatches_in_flight
                )
                assert 0.0 <= occupancy.bubble_ratio <= occupancy.bubble_ratio_max <= 1.0
            text = (await http.get("/metrics")).text
            for device_id, _stage, value in IN_FLIGHT.findall(text):
                in_flight_metrics[device_id] = max(
                    in_flight_metrics.get(device_id, 0.0), float(value)
                )
            bubbles.extend(float(value) for _, _, value in BUBBLE.findall(text))
        assert all(tokens >= 1 for tokens in await runs)
        stats = StatsResponse.model_validate((await http.get("/api/stats")).json())
        await env.next_poll()
        await env.next_poll()
        metrics = (await http.get("/metrics")).text

    # 8 requests over 2 micro-batches (one per stage): each Forward carries several.
    assert set(largest_batch) == {"worker-0", "worker-1"}
    assert all(size > 1 for size in largest_batch.values()), largest_batch
    assert all(n >= 1 for n in in_flight_api.values()), in_flight_api
    assert set(in_flight_metrics) == {"worker-0", "worker-1"}
    assert max(in_flight_metrics.values()) >= 1, in_flight_metrics
    assert bubbles and all(0.0 <= b <= 1.0 for b in bubbles)
    # After the run: the stats view carries the coordinator's numbers, nothing is in flight.
    by_device = {s.device_id: s for s in stats.stages}
    for device_id in ("worker-0", "worker-1"):
        summary = by_device[device_id]
        assert summary.batch_size_mean is not None and summary.batch_size_mean > 1
        assert summary.microbatches_in_flight == 0
    # The workers' own histogram agrees: more requests than calls.
    for device_id, stage in (("worker-0", "0"), ("worker-1", "1")):
        labels = f'device="{device_id}",stage="{stage}"'
        total = _sample(metrics, f"mlxrelay_stage_batch_size_sum{{{labels}}}")
        calls = _sample(metrics, f"mlxrelay_stage_batch_size_count{{{labels}}}")
        assert calls > 0 and total / calls > 1


def _sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match is not None, f"{series} missing from /metrics"
    return float(match[1])


async def test_each_stage_bubble_is_the_time_it_did_not_compute_while_a_request_ran(
    tiny_model_dir: Path,
) -> None:
    """One request on two stages: the stages compute in turn, so each idles while the other
    computes and while hidden states and tokens travel. The bubble the coordinator shows
    for a stage is the request's time less the compute time that stage measured itself."""
    async with local_cluster(tiny_model_dir, 2, enable_monitoring=True) as cluster:
        orchestrator = cluster.orchestrator
        collector = orchestrator.metrics_collector
        assert collector is not None

        def busy() -> dict[str, float]:
            return {
                w.device_id: w.collector.snapshot().stages[w.device_id].busy_seconds_total
                for w in cluster.workers
            }

        before = busy()
        started = time.perf_counter()
        response = await orchestrator.process_request(
            InferenceRequest(prompt=f"{PROMPT_MARKER} alone", max_tokens=MAX_TOKENS)
        )
        elapsed = time.perf_counter() - started
        after = busy()
        occupancy = collector.snapshot().occupancy
    assert response.usage.completion_tokens == MAX_TOKENS
    for device_id in ("worker-0", "worker-1"):
        stage = occupancy[device_id]
        computed = after[device_id] - before[device_id]
        assert 0 < computed < elapsed
        idle = stage.bubble_ratio * stage.window_seconds
        assert stage.microbatches_in_flight == 0
        assert stage.bubble_ratio_max == stage.bubble_ratio
        assert idle == pytest.approx(elapsed - computed, abs=0.02 + 0.05 * elapsed)
