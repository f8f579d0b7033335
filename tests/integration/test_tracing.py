"""One trace per request across the coordinator's and every stage's process: real gRPC
workers on port 0, each process with its own local ``TracerProvider`` and
``InMemorySpanExporter`` (never the global provider)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mlx_relay.coordinator.orchestrator import InferenceRequest, InferenceResponse
from mlx_relay.monitoring.traces import trace_document
from tests.support.cluster import local_cluster

PROMPT = "Each worker holds a contiguous range of transformer layers"
DEVICES = ("coordinator", "worker-0", "worker-1", "worker-2")


def providers() -> tuple[dict[str, Any], dict[str, InMemorySpanExporter]]:
    """A local provider and in-memory exporter per process of a 3-worker cluster."""
    given, exporters = {}, {}
    for device in DEVICES:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        given[device], exporters[device] = provider, exporter
    return given, exporters


def by_trace(spans: list[ReadableSpan], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == trace_id]


def check_attribution_sums(document: dict[str, Any]) -> None:
    attribution = document["attribution"]
    parts = (
        attribution["queue_s"]
        + attribution["coordinator_s"]
        + sum(attribution["compute_s"].values())
        + sum(attribution["network_s"].values())
        + attribution["bubble_s"]
    )
    e2e = attribution["e2e_s"]
    assert e2e == pytest.approx(document["duration_s"])
    assert abs(parts - e2e) <= 0.02 * e2e, attribution
    assert set(attribution["compute_s"]) == {"worker-0", "worker-1", "worker-2"}
    assert all(v > 0 for v in attribution["compute_s"].values()), attribution
    assert set(attribution["network_s"]) == {
        "coordinator → worker-0",
        "worker-0 → worker-1",
        "worker-1 → worker-2",
    }
    assert all(v > 0 for v in attribution["network_s"].values()), attribution


async def test_one_trace_per_request_spans_every_process_linked_parent_to_child(
    tiny_model_dir: Path,
) -> None:
    given, exporters = providers()
    # One micro-batch in flight: the three requests share each step.
    async with local_cluster(
        tiny_model_dir, 3, tracer_providers=given, inference={"micro_batches": 1}
    ) as cluster:
        orchestrator = cluster.orchestrator
        responses: list[InferenceResponse] = await asyncio.gather(
            *(
                orchestrator.process_request(
                    InferenceRequest(prompt=f"{PROMPT} {i}", max_tokens=4 + i)
                )
                for i in range(3)
            )
        )
        store = orchestrator.traces
        assert store is not None
        documents = [trace_document(store.get(r.request_id)) for r in responses]  # type: ignore[arg-type]
        model = orchestrator.model_info.name
    spans = {device: exporters[device].get_finished_spans() for device in DEVICES}
    trace_ids = {int(d["trace_id"], 16) for d in documents}
    assert len(trace_ids) == 3  # one trace per request
    batch_sizes = []
    for response, document in zip(responses, documents, strict=True):
        trace_id = int(document["trace_id"], 16)
        mine = {device: by_trace(spans[device], trace_id) for device in DEVICES}
        assert all(mine.values()), {d: len(s) for d, s in mine.items()}  # every process
        (root,) = [s for s in mine["coordinator"] if s.parent is None]
        assert root.name == f"text_completion {model}"
        attributes = dict(root.attributes or {})
        assert attributes["gen_ai.operation.name"] == "text_completion"
        assert attributes["gen_ai.request.model"] == model
        assert attributes["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
        assert attributes["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
        assert attributes["gen_ai.response.finish_reasons"] == (response.finish_reason,)
        assert attributes["gen_ai.server.time_to_first_token"] > 0
        assert attributes["gen_ai.server.time_per_output_token"] > 0
        steps = [s for s in mine["coordinator"] if s.name in ("prefill chunk", "decode step")]
        decode_steps = [s for s in steps if s.name == "decode step"]
        # The last prompt token's step samples the first token: one decode step per token.
        assert len(decode_steps) == response.usage.completion_tokens
        batch_sizes += [dict(s.attributes or {})["mlx_relay.batch.size"] for s in steps]
        # Parents and children across processes: each stage's server span hangs under its
        # caller's call span, one per step on every stage.
        callers = {
            "worker-0": {
                s.context.span_id for s in mine["coordinator"] if s.name == "Forward worker-0"
            },
            "worker-1": {
                s.context.span_id for s in mine["worker-0"] if s.name == "Forward worker-1"
            },
            "worker-2": {
                s.context.span_id for s in mine["worker-1"] if s.name == "Forward worker-2"
            },
        }
        for index, device in enumerate(DEVICES[1:]):
            servers = [s for s in mine[device] if s.name == f"stage {index} forward"]
            assert len(servers) == len(steps), device
            assert {s.parent.span_id for s in servers if s.parent} == callers[device], device
            assert all(s.parent is not None and s.parent.is_remote for s in servers)
            names = Counter(s.name for s in mine[device])
            assert names["compute"] == len(steps), (device, names)
            part = "sample" if device == "worker-2" else "encode"
            assert names[part] == len(steps), (device, names)
        # The store's trace: the same trace, a lane per stage and link, attribution summing.
        assert document["request_id"] == response.request_id
        assert int(document["spans"][0]["span_id"], 16) == root.context.span_id
        assert document["lanes"] == [
            "coordinator",
            "link coordinator → worker-0",
            "stage 0 · worker-0",
            "link worker-0 → worker-1",
            "stage 1 · worker-1",
            "link worker-1 → worker-2",
            "stage 2 · worker-2",
        ]
        lanes = Counter(s["lane"] for s in document["spans"])
        assert all(lanes[lane] > 0 for lane in document["lanes"]), lanes
        stored = {s["span_id"] for s in document["spans"] if s["name"] == "decode step"}
        assert stored == {f"{s.context.span_id:016x}" for s in decode_steps}
        check_attribution_sums(document)
    assert max(batch_sizes) >= 2  # the three requests shared micro-batches


async def test_traces_are_kept_without_a_tracer_provider_and_bounded(tiny_model_dir: Path) -> None:
    async with local_cluster(tiny_model_dir, 3, tracing={"max_traces": 2}) as cluster:
        orchestrator = cluster.orchestrator
        responses = [
            await orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=3))
            for _ in range(3)
        ]
        store = orchestrator.traces
        assert store is not None
        assert len(store) == 2
        assert store.get(responses[0].request_id) is None  # the oldest left first
        document = trace_document(store.get(responses[2].request_id))  # type: ignore[arg-type]
    assert document["output_tokens"] == responses[2].usage.completion_tokens
    assert document["status"] == "ok"
    check_attribution_sums(document)


async def test_tracing_off_keeps_nothing(tiny_model_dir: Path) -> None:
    given, exporters = providers()
    async with local_cluster(
        tiny_model_dir, 3, tracing={"enabled": False}, tracer_providers=given
    ) as cluster:
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt=PROMPT, max_tokens=3)
        )
        assert cluster.orchestrator.traces is None
    assert response.usage.completion_tokens > 0
    assert all(not exporters[d].get_finished_spans() for d in DEVICES)


async def test_a_worker_traces_only_calls_that_carry_trace_context(tiny_model_dir: Path) -> None:
    import grpc.aio

    from mlx_relay.proto import relay_pb2, relay_pb2_grpc
    from mlx_relay.wire import encode_token_ids

    given, exporters = providers()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with local_cluster(
        tiny_model_dir, 3, tracer_providers=given, initialize=False
    ) as cluster:
        first = cluster.config.workers[0]
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = relay_pb2_grpc.WorkerStub(channel)

            def call(request_id: str) -> relay_pb2.ForwardRequest:
                entry = relay_pb2.ForwardEntry(
                    request_id=request_id, position=0, tensor=encode_token_ids([1, 2, 3])
                )
                return relay_pb2.ForwardRequest(entries=[entry])

            await stub.Forward(call("untraced"), timeout=30)
            untraced = list(exporters["worker-0"].get_finished_spans())
            # Only the call's metadata carries the context (a caller without entry contexts).
            await stub.Forward(call("traced"), timeout=30, metadata=(("traceparent", parent),))
    assert untraced == []
    spans = exporters["worker-0"].get_finished_spans()
    (server,) = [s for s in spans if s.name == "stage 0 forward"]
    assert server.parent is not None and server.parent.span_id == 0xB7AD6B7169203331
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert {s.name for s in spans} >= {"check", "compute", "encode"}
