"""A 2-stage pipeline on one host: a request alone runs each stage on all the host's cores
(the stages compute in turn), concurrent requests in a micro-batch per stage one core each,
and the tokens stay those of one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.blas import available_cores, loaded_blas, set_threads
from tests.integration.test_pipeline import PROMPTS, prompt_ids
from tests.support.cluster import local_cluster
from tests.support.reference import reference_tokens


def process_threads() -> int:
    library = loaded_blas()
    return library.threads if library is not None else 0


async def test_blas_threads_follow_the_micro_batches_in_flight(tiny_model_dir: Path) -> None:
    if process_threads() == 0:
        pytest.skip("no OpenBLAS loaded: MLX computes with its bundled BLAS")
    cores = available_cores()
    if cores < 2:
        pytest.skip("one core: every step runs one BLAS thread")
    # Both workers run in this process, so the process's thread count is what each step set.
    # Two micro-batches in flight (one machine's default is one: both cores per step).
    async with local_cluster(tiny_model_dir, 2, inference={"micro_batches": 2}) as cluster:
        orchestrator = cluster.orchestrator
        alone = await orchestrator.process_request(
            InferenceRequest(prompt=PROMPTS[0], max_tokens=8)
        )
        after_alone = process_threads()

        seen: set[int] = set()
        runs = asyncio.gather(
            *(
                orchestrator.process_request(InferenceRequest(prompt=p, max_tokens=24))
                for p in PROMPTS
            )
        )
        while not runs.done():
            seen.add(process_threads())
            await asyncio.sleep(0)
        together = await runs

    assert after_alone == cores
    assert cores // 2 in seen, seen  # two micro-batches in flight: a core per stage
    expected = [
        [t.token_id for t in reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir, p), n)]
        for p, n in [(PROMPTS[0], 8), *((p, 24) for p in PROMPTS)]
    ]
    assert [alone.token_ids, *(r.token_ids for r in together)] == expected


async def test_micro_batches_of_every_replica_path_count(tiny_model_dir: Path) -> None:
    """Stage 0 with two replicas: two requests take two paths, one micro-batch each, and
    the stages of the host may compute both at once: a core each, not all cores each."""
    if process_threads() == 0:
        pytest.skip("no OpenBLAS loaded: MLX computes with its bundled BLAS")
    cores = available_cores()
    if cores < 2:
        pytest.skip("one core: every step runs one BLAS thread")
    layers = [(0, 2), (0, 2), (2, 4)]
    async with local_cluster(
        tiny_model_dir, 3, layers=layers, inference={"micro_batches": 2}
    ) as cluster:
        orchestrator = cluster.orchestrator
        set_threads(cores)
        seen: set[int] = set()
        runs = asyncio.gather(
            *(
                orchestrator.process_request(InferenceRequest(prompt=p, max_tokens=24))
                for p in PROMPTS[:2]
            )
        )
        while not runs.done():
            seen.add(process_threads())
            await asyncio.sleep(0)
        together = await runs
        sessions = sum(w.kv_sessions for w in cluster.workers)
    # The second path's steps leave with 2 micro-batches in flight (one per path): half
    # the cores, where counting only their own loop's would take them all.
    assert cores // 2 in seen, seen
    assert sessions == 0
    expected = [
        [t.token_id for t in reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir, p), 24)]
        for p in PROMPTS[:2]
    ]
    assert [r.token_ids for r in together] == expected
