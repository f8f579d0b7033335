"""The distributed pipeline over real gRPC workers equals single-process generation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.errors import PipelineNotReady, QueueFull
from mlx_relay.model.sampling import SamplingParams
from mlx_relay.model.tokenizer import encode_prompt
from tests.support.cluster import local_cluster
from tests.support.reference import cached_tokenizer, reference_tokens

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "x",
    "Each worker holds a contiguous range of transformer layers and its own cache.",
]


def prompt_ids(model_dir: Path, prompt: str) -> list[int]:
    return encode_prompt(cached_tokenizer(model_dir), prompt=prompt, chat=False)


@pytest.mark.parametrize("num_workers", [1, 2, 3])
async def test_greedy_output_equals_single_process(tiny_model_dir: Path, num_workers: int) -> None:
    async with local_cluster(tiny_model_dir, num_workers) as cluster:
        orchestrator = cluster.orchestrator
        assert [len(s.layer_range) for s in orchestrator.stages] == {
            1: [4],
            2: [2, 2],
            3: [2, 1, 1],
        }[num_workers]
        for prompt in PROMPTS:
            expected = reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir, prompt), 12)
            response = await orchestrator.process_request(
                InferenceRequest(prompt=prompt, max_tokens=12)
            )
            assert response.token_ids == [t.token_id for t in expected], prompt
            assert response.finish_reason == ("length" if len(expected) == 12 else "stop")
            assert response.usage.prompt_tokens == len(prompt_ids(tiny_model_dir, prompt))
            assert response.usage.completion_tokens == len(expected)
            assert response.text == cached_tokenizer(tiny_model_dir).decode(response.token_ids)
        assert sum(w.kv_sessions for w in cluster.workers) == 0


@pytest.fixture(scope="module")
def quantized_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_model import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-quantized")
    return make_tiny_model_dir(root, arch="llama", num_layers=4, quantize=True)


@pytest.mark.parametrize("compute", ["quantized", "float32"])
async def test_both_compute_paths_equal_single_process(
    quantized_model_dir: Path, compute: str
) -> None:
    async with local_cluster(quantized_model_dir, 2, model={"compute": compute}) as cluster:
        assert {w._state.runtime.engine.compute for w in cluster.workers} == {compute}
        for prompt in PROMPTS:
            ids = prompt_ids(quantized_model_dir, prompt)
            expected = reference_tokens(quantized_model_dir, ids, 12, compute=compute)
            response = await cluster.orchestrator.process_request(
                InferenceRequest(prompt=prompt, max_tokens=12)
            )
            assert response.token_ids == [t.token_id for t in expected], prompt


async def test_seeded_sampling_equals_single_process(tiny_model_dir: Path) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    ids = prompt_ids(tiny_model_dir, PROMPTS[1])
    expected = [t.token_id for t in reference_tokens(tiny_model_dir, ids, 16, params)]
    async with local_cluster(tiny_model_dir, 2) as cluster:
        request = dict(prompt=PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.95, top_k=50)
        first = await cluster.orchestrator.process_request(InferenceRequest(**request, seed=1234))
        again = await cluster.orchestrator.process_request(InferenceRequest(**request, seed=1234))
        other = await cluster.orchestrator.process_request(InferenceRequest(**request, seed=99))
    assert first.token_ids == expected
    assert again.token_ids == expected
    assert other.token_ids != expected


async def test_concurrent_requests_each_match_single_process(tiny_model_dir: Path) -> None:
    cases = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 6 + i) for i in range(8)]
    expected = [
        [t.token_id for t in reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir, p), n)]
        for p, n in cases
    ]
    async with local_cluster(tiny_model_dir, 2) as cluster:
        orchestrator = cluster.orchestrator
        responses = await asyncio.gather(
            *(
                orchestrator.process_request(InferenceRequest(prompt=p, max_tokens=n))
                for p, n in cases
            )
        )
        assert [r.token_ids for r in responses] == expected
        assert len({r.request_id for r in responses}) == 8
        assert sum(w.kv_sessions for w in cluster.workers) == 0


async def test_stream_events_add_up_to_the_response(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 2) as cluster:
        request = InferenceRequest(prompt=PROMPTS[0], max_tokens=10, logprobs=True, top_logprobs=3)
        events = [e async for e in cluster.orchestrator.stream_request(request)]
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt=PROMPTS[0], max_tokens=10, logprobs=True, top_logprobs=3)
        )
    *tokens, last = events
    assert [e.token_id for e in tokens] == response.token_ids
    assert [e.index for e in tokens] == list(range(len(tokens)))
    assert all(e.request_id == request.request_id for e in events)
    assert "".join(e.text for e in events) == response.text
    assert last.token_id is None and last.finish_reason == response.finish_reason
    assert last.usage is not None and last.usage.completion_tokens == len(tokens)
    expected = reference_tokens(tiny_model_dir, prompt_ids(tiny_model_dir, PROMPTS[0]), 10)
    assert response.logprobs is not None
    for logprob, sampled in zip(response.logprobs, expected, strict=True):
        assert logprob.token_id == sampled.token_id
        assert logprob.logprob == pytest.approx(sampled.logprob, abs=1e-4)
        assert len(logprob.top_logprobs) == 3
        assert logprob.top_logprobs[0][0] == sampled.token_id  # greedy = most likely


async def test_stop_string_truncates_the_text(tiny_model_dir: Path) -> None:
    ids = prompt_ids(tiny_model_dir, PROMPTS[1])
    tokenizer = cached_tokenizer(tiny_model_dir)
    full = tokenizer.decode([t.token_id for t in reference_tokens(tiny_model_dir, ids, 16)])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop.strip()) > 0, "the random model's output is too short for this test"
    async with local_cluster(tiny_model_dir, 2) as cluster:
        request = InferenceRequest(prompt=PROMPTS[1], max_tokens=16, stop=[stop])
        events = [e async for e in cluster.orchestrator.stream_request(request)]
    text = "".join(e.text for e in events)
    assert text == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)


async def test_eos_ends_generation_with_stop(tiny_model_dir: Path) -> None:
    ids = prompt_ids(tiny_model_dir, PROMPTS[0])
    expected = [t.token_id for t in reference_tokens(tiny_model_dir, ids, 8)]
    async with local_cluster(tiny_model_dir, 2) as cluster:
        # Make the fourth greedy token the end-of-sequence token.
        cluster.orchestrator._eos_ids = {expected[3]}
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt=PROMPTS[0], max_tokens=8)
        )
    assert response.finish_reason == "stop"
    assert response.token_ids == expected[: expected.index(expected[3])]


async def test_abandoned_stream_is_aborted_and_sessions_end(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 2, enable_monitoring=True) as cluster:
        orchestrator = cluster.orchestrator
        stream = orchestrator.stream_request(InferenceRequest(prompt=PROMPTS[3], max_tokens=50))
        got = [await anext(stream), await anext(stream)]
        assert all(e.finish_reason is None for e in got)
        assert [w.kv_sessions for w in cluster.workers] == [1, 1]
        await stream.aclose()  # type: ignore[attr-defined]
        await wait_for(lambda: sum(w.kv_sessions for w in cluster.workers) == 0)
        assert orchestrator.running_requests == 0
        inference = orchestrator.metrics_collector.export_metrics()["inference"]
        assert inference["success_total"]["abort"] == 1


async def test_cancelled_consumer_aborts_the_request(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 2) as cluster:
        orchestrator = cluster.orchestrator
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in orchestrator.stream_request(
                InferenceRequest(prompt=PROMPTS[3], max_tokens=200)
            ):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: sum(w.kv_sessions for w in cluster.workers) == 0)
        assert orchestrator.running_requests == 0


async def test_queue_full_is_immediate(tiny_model_dir: Path) -> None:
    limits = {"max_running_requests": 1, "max_waiting_requests": 1}
    async with local_cluster(tiny_model_dir, 1, inference=limits) as cluster:
        orchestrator = cluster.orchestrator
        running = orchestrator.stream_request(InferenceRequest(prompt="a", max_tokens=50))
        await anext(running)
        waiting = asyncio.create_task(
            orchestrator.process_request(InferenceRequest(prompt="b", max_tokens=2))
        )
        await wait_for(lambda: orchestrator.waiting_requests == 1)
        with pytest.raises(QueueFull):
            orchestrator.stream_request(InferenceRequest(prompt="c", max_tokens=2))
        await running.aclose()  # type: ignore[attr-defined]
        response = await asyncio.wait_for(waiting, 30)
        assert response.usage.completion_tokens >= 1
        assert response.timings.queue > 0


async def test_timings_and_monitoring_record_the_request(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 2, enable_monitoring=True) as cluster:
        orchestrator = cluster.orchestrator
        response = await orchestrator.process_request(
            InferenceRequest(prompt=PROMPTS[0], max_tokens=5)
        )
        snapshot = orchestrator.metrics_collector.export_metrics()
    timings = response.timings
    assert set(timings.stage_compute) == {"worker-0", "worker-1"}
    assert all(v > 0 for v in timings.stage_compute.values())
    assert timings.ttft is not None and 0 < timings.ttft <= timings.total
    assert timings.network > 0 and timings.tokens_per_second > 0
    assert timings.prefill + timings.decode <= timings.total + 1e-6
    inference = snapshot["inference"]
    assert inference["success_total"]["length"] == 1
    assert inference["generation_tokens_total"] == 5
    links = {link["peer"]: link for link in snapshot["network"]["links"]}
    assert {"worker-0", "worker-1"} <= set(links)
    assert links["worker-0"]["transmit_bytes_total"] > 0


async def test_monitoring_disabled_creates_nothing(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 2, enable_monitoring=False) as cluster:
        orchestrator = cluster.orchestrator
        tasks_before = {t.get_name() for t in asyncio.all_tasks()}
        await orchestrator.process_request(InferenceRequest(prompt="hello", max_tokens=3))
        assert orchestrator.metrics_collector is None
        assert orchestrator.health_monitor is None
        assert orchestrator.cluster_monitor is None
        assert not any("metrics" in n or "cluster" in n or "health" in n for n in tasks_before)


async def test_stage_health_and_not_ready(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 2, initialize=False) as cluster:
        orchestrator = cluster.orchestrator
        with pytest.raises(PipelineNotReady):
            await orchestrator.process_request(InferenceRequest(prompt="hi"))
        await orchestrator.initialize()
        assert await orchestrator.stage_health() == [
            ("worker-0", "SERVING"),
            ("worker-1", "SERVING"),
        ]
        await cluster.workers[1].stop(grace=0)
        assert await orchestrator.stage_health() == [
            ("worker-0", "SERVING"),
            ("worker-1", "UNREACHABLE"),
        ]
        await orchestrator.shutdown()
        with pytest.raises(PipelineNotReady, match="shutting down"):
            orchestrator.stream_request(InferenceRequest(prompt="hi"))


@pytest.mark.slow
async def test_bundled_model_two_stages_equals_single_process(bundled_model_dir: Path) -> None:
    prompts = ["What is the capital of France?", "Write one word:"]
    tokenizer = cached_tokenizer(bundled_model_dir)
    texts = []
    async with local_cluster(bundled_model_dir, 2) as cluster:
        assert [s.layer_range.end for s in cluster.orchestrator.stages] == [15, 30]
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            ids = encode_prompt(tokenizer, messages=messages)
            expected = [t.token_id for t in reference_tokens(bundled_model_dir, ids, 8)]
            response = await cluster.orchestrator.process_request(
                InferenceRequest(messages=messages, max_tokens=8)
            )
            assert response.token_ids == expected, prompt
            texts.append(response.text)
    assert "Paris" in texts[0]


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
