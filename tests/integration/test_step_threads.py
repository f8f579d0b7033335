"""A 2-stage pipeline on one host: a request alone runs each stage on all the host's cores
(the stages compute in turn), concurrent requests in a micro-batch per stage one core each,
and the tokens stay those of one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.blas import available_cores, loaded_blas
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
    async with local_cluster(tiny_model_dir, 2) as cluster:
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
