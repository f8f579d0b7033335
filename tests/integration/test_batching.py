"""Continuous batching over real gRPC workers: concurrent requests of different lengths,
arriving at different times, each give exactly what they give alone in one process."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from mlx_relay.coordinator import orchestrator as orchestrator_module
from mlx_relay.coordinator import step_loop
from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.model.sampling import SamplingParams
from tests.integration.test_pipeline import PROMPTS, prompt_ids, wait_for
from tests.support.cluster import local_cluster
from tests.support.reference import cached_tokenizer, reference_tokens

SEEDED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 77}


def cases(model_dir: Path) -> list[dict[str, Any]]:
    """Nine requests: four prompt lengths, max_tokens 5 to 21, a stop string cut from the
    reference output, one seeded sampled request."""
    out: list[dict[str, Any]] = []
    for i in range(9):
        prompt = PROMPTS[i % len(PROMPTS)] + " again" * (i // len(PROMPTS))
        out.append({"prompt": prompt, "max_tokens": 5 + 2 * i})
    out[4].update(SEEDED)
    tokenizer = cached_tokenizer(model_dir)
    reference = expected_tokens(model_dir, out[6])
    text = tokenizer.decode(reference)
    out[6]["stop"] = [text[len(text) // 2 : len(text) // 2 + 2]]
    return out


def expected_tokens(model_dir: Path, case: dict[str, Any]) -> list[int]:
    params = SamplingParams(**{k: case[k] for k in SEEDED if k in case})
    ids = prompt_ids(model_dir, case["prompt"])
    return [t.token_id for t in reference_tokens(model_dir, ids, case["max_tokens"], params)]


def expected_text(model_dir: Path, case: dict[str, Any]) -> str:
    text = cached_tokenizer(model_dir).decode(expected_tokens(model_dir, case))
    for stop in case.get("stop", []):
        if stop in text:
            text = text[: text.index(stop)]
    return text


@pytest.mark.parametrize(
    ("num_workers", "micro_batches"),
    [(1, None), (2, 2), (3, 3), (2, None)],
    # Loopback stages are one machine: by default one micro-batch in flight.
    ids=["1-stage", "2-stages-2-micro-batches", "3-stages-3-micro-batches", "2-stages-default"],
)
async def test_concurrent_requests_arriving_at_different_times_match_single_process(
    tiny_model_dir: Path, num_workers: int, micro_batches: int | None
) -> None:
    requests = cases(tiny_model_dir)
    inference = {"micro_batches": micro_batches}
    async with local_cluster(
        tiny_model_dir, num_workers, worker_monitoring=True, inference=inference
    ) as cluster:
        orchestrator = cluster.orchestrator
        batched_rows: list[int] = []
        texts: dict[int, str] = {}
        tokens: dict[int, list[int]] = {}
        started = [asyncio.Event() for _ in requests]

        async def one(i: int) -> None:
            if i > 0:
                await started[i - 1].wait()  # arrives once the one before it streams
            stream = orchestrator.stream_request(InferenceRequest(**requests[i]))
            parts: list[str] = []
            ids: list[int] = []
            async for event in stream:
                started[i].set()
                batched_rows.append(sum(w.batched_rows for w in cluster.workers))
                parts.append(event.text)
                if event.token_id is not None:
                    ids.append(event.token_id)
                if i == 8 and len(ids) == 3:
                    break  # the last one is cancelled mid-batch
            started[i].set()
            texts[i], tokens[i] = "".join(parts), ids

        await asyncio.gather(*(one(i) for i in range(len(requests))))
        await wait_for(lambda: sum(w.kv_sessions for w in cluster.workers) == 0)
        await wait_for(lambda: sum(w.batched_rows for w in cluster.workers) == 0)
        assert orchestrator.running_requests == 0
        # Each stage recorded how many requests its forward calls computed at once.
        for worker in cluster.workers:
            batch = worker.collector.export_metrics()["stages"][worker.device_id]["batch_size"]
            assert batch["count"] > 0
            assert batch["sum"] > batch["count"], "some forward calls batched several requests"

    assert max(batched_rows) >= 3 * num_workers, "requests must really share steps"
    for i, case in enumerate(requests):
        expected = expected_tokens(tiny_model_dir, case)
        if i == 8:
            assert tokens[i] == expected[:3]
        elif "stop" in case:
            assert texts[i] == expected_text(tiny_model_dir, case)
            assert tokens[i] == expected[: len(tokens[i])]
        else:
            assert tokens[i] == expected, case
            assert texts[i] == cached_tokenizer(tiny_model_dir).decode(expected)


async def test_a_long_prompt_prefills_in_chunks_beside_running_streams(
    tiny_model_dir: Path,
) -> None:
    long_prompt = " ".join(PROMPTS * 3)
    ids = prompt_ids(tiny_model_dir, long_prompt)
    assert len(ids) > 48  # more than 6 chunks of 8
    log: list[tuple[str, int | None]] = []

    async def consume(name: str, request: InferenceRequest, first: asyncio.Event) -> None:
        async for event in cluster.orchestrator.stream_request(request):
            log.append((name, event.token_id))
            first.set()

    async with local_cluster(tiny_model_dir, 2, inference={"prefill_chunk_tokens": 8}) as cluster:
        firsts = [asyncio.Event() for _ in range(4)]
        shorts = [
            asyncio.create_task(consume(f"s{i}", InferenceRequest(prompt=p, max_tokens=30), e))
            for i, (p, e) in enumerate(zip(PROMPTS[:3], firsts, strict=False))
        ]
        for event in firsts[:3]:
            await event.wait()
        log.append(("long submitted", None))
        long = InferenceRequest(prompt=long_prompt, max_tokens=6)
        await asyncio.gather(consume("long", long, firsts[3]), *shorts)

    submitted = log.index(("long submitted", None))
    first_long = next(i for i, (name, _) in enumerate(log) if name == "long")
    during = [name for name, _ in log[submitted:first_long]]
    # The running streams kept streaming while the long prompt prefilled chunk by chunk.
    assert all(during.count(f"s{i}") >= 4 for i in range(3)), during
    got = [token for name, token in log if name == "long" and token is not None]
    assert got == [t.token_id for t in reference_tokens(tiny_model_dir, ids, 6)]


async def test_a_prompt_larger_than_one_message_completes_in_chunks(tmp_path: Path) -> None:
    """4,000 prompt positions of hidden states (128 float32 each) make 2 MB: more than
    ``max_message_mb: 1`` in one message, a quarter of it in chunks of 512 positions."""
    from tests.support.tiny_model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(
        tmp_path / "long-context",
        hidden_size=128,
        config_overrides={"max_position_embeddings": 8192},
    )
    prompt = [(7 * i) % 300 + 10 for i in range(4000)]
    assert len(prompt) * 128 * 4 > 1024 * 1024
    network = {"max_message_mb": 1}
    async with local_cluster(model_dir, 2, network=network) as cluster:
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt_tokens=prompt, max_tokens=4)
        )
        assert sum(w.kv_sessions for w in cluster.workers) == 0
    assert response.usage.prompt_tokens == 4000
    assert response.token_ids == [t.token_id for t in reference_tokens(model_dir, prompt, 4)]


async def test_wait_idle_returns_once_cancelled_streams_have_left_every_stage(
    tiny_model_dir: Path,
) -> None:
    async with local_cluster(tiny_model_dir, 2, inference={"micro_batches": 2}) as cluster:
        orchestrator = cluster.orchestrator
        started = [asyncio.Event() for _ in range(4)]

        async def stream(i: int) -> None:
            request = InferenceRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=200)
            async for event in orchestrator.stream_request(request):
                if event.token_id is not None:
                    started[i].set()

        tasks = [asyncio.create_task(stream(i)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(orchestrator.wait_idle(), timeout=30)
        assert orchestrator.running_requests == 0 and orchestrator.waiting_requests == 0
        loops = orchestrator._router.loops if orchestrator._router is not None else []
        assert loops and all(loop.in_flight == 0 and loop.scheduled == 0 for loop in loops)
        await wait_for(lambda: sum(w.kv_sessions for w in cluster.workers) == 0)


BURST = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[0] + " again", PROMPTS[1] + " and again"]


async def test_a_burst_on_an_idle_pipeline_starts_as_one_micro_batch(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests sent together wait for each other's tokenization, then every step carries
    all of them: one prefill call for all on each stage, then decode calls of all."""
    # Only the end of the burst's tokenization starts it, never the time limit.
    monkeypatch.setattr(step_loop, "ARRIVAL_WAIT", 30.0)
    max_tokens = 3
    async with local_cluster(tiny_model_dir, 2, worker_monitoring=True) as cluster:
        responses = await asyncio.gather(
            *(
                cluster.orchestrator.process_request(
                    InferenceRequest(prompt=p, max_tokens=max_tokens)
                )
                for p in BURST
            )
        )
        for worker in cluster.workers:
            stage = worker.collector.export_metrics()["stages"][worker.device_id]
            calls = stage["batch_size"]
            assert calls["count"] == 1 + max_tokens, "one prefill, then one decode per token"
            assert calls["sum"] == len(BURST) * (1 + max_tokens), "every call carried all"
    for prompt, response in zip(BURST, responses, strict=True):
        ids = prompt_ids(tiny_model_dir, prompt)
        assert response.token_ids == [
            t.token_id for t in reference_tokens(tiny_model_dir, ids, max_tokens)
        ]


async def test_a_request_waits_for_a_slow_tokenization_at_most_arrival_wait(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_loop, "ARRIVAL_WAIT", 0.2)
    release = threading.Event()
    real_prepare = orchestrator_module.prepare_request

    def prepare(request: InferenceRequest, *args: Any) -> Any:
        if request.prompt == "slow":
            release.wait(60)  # a prompt still being tokenized
        return real_prepare(request, *args)

    monkeypatch.setattr(orchestrator_module, "prepare_request", prepare)
    async with local_cluster(tiny_model_dir, 2) as cluster:
        orchestrator = cluster.orchestrator
        fast = asyncio.create_task(
            orchestrator.process_request(InferenceRequest(prompt=PROMPTS[0], max_tokens=4))
        )
        slow = asyncio.create_task(
            orchestrator.process_request(InferenceRequest(prompt="slow", max_tokens=2))
        )
        # The fast request joins while the slow one is tokenized, and starts anyway.
        response = await asyncio.wait_for(fast, 30)
        assert not slow.done()
        assert response.token_ids == [
            t.token_id
            for t in reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir, PROMPTS[0]), 4)
        ]
        release.set()
        assert len((await asyncio.wait_for(slow, 30)).token_ids) == 2
