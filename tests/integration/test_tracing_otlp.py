"""OTLP export: a live 2-worker cluster (``mlx-relay worker`` subprocesses) and its coordinator,
all with ``tracing.otlp_endpoint`` set, send a request's spans to a real OTLP/HTTP receiver
that decodes them with ``opentelemetry-proto``."""

from __future__ import annotations

from pathlib import Path

from mlx_relay.coordinator.orchestrator import InferenceRequest
from tests.support.cluster import process_cluster
from tests.support.otlp_receiver import ReceivedSpan, otlp_receiver


async def test_a_live_cluster_exports_a_requests_spans_over_otlp_http(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with otlp_receiver() as receiver:
        tracing = {"otlp_endpoint": receiver.url}
        async with process_cluster(tiny_model_dir, tmp_path, 2, tracing=tracing) as cluster:
            orchestrator = cluster.orchestrator
            response = await orchestrator.process_request(
                InferenceRequest(prompt="Spans travel over OTLP", max_tokens=3)
            )
            store = orchestrator.traces
            assert store is not None
            timeline = store.get(response.request_id)
            assert timeline is not None
            trace_id = f"{timeline.trace_id:032x}"
            model = orchestrator.model_info.name
        # Stopping flushes every process's last batch.

        def complete(spans: list[ReceivedSpan]) -> bool:
            mine = {s.instance for s in spans if s.trace_id == trace_id}
            return mine >= {"coordinator", "worker-0", "worker-1"}

        spans = await receiver.wait_for(complete)
    mine = [s for s in spans if s.trace_id == trace_id]
    services = {s.instance: s.service for s in mine}
    assert services == {
        "coordinator": "mlx-relay-coordinator",
        "worker-0": "mlx-relay-worker",
        "worker-1": "mlx-relay-worker",
    }
    (root,) = [s for s in mine if not s.parent_id]
    assert root.instance == "coordinator"
    assert root.name == f"text_completion {model}"
    assert root.attributes["gen_ai.operation.name"] == "text_completion"
    assert root.attributes["gen_ai.request.model"] == model
    assert root.attributes["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    assert root.attributes["gen_ai.response.finish_reasons"] == [response.finish_reason]
    # Each worker's server spans hang under its caller's call spans, across processes.
    ids = {s.span_id: s for s in mine}
    for index, (caller, device) in enumerate(
        [("coordinator", "worker-0"), ("worker-0", "worker-1")]
    ):
        servers = [s for s in mine if s.instance == device and s.name == f"stage {index} forward"]
        assert servers, device
        for server in servers:
            parent = ids[server.parent_id]
            assert (parent.instance, parent.name) == (caller, f"Forward {device}")
    steps = [s for s in mine if s.name in ("prefill chunk", "decode step")]
    servers = [s for s in mine if s.instance == "worker-1" and s.name == "stage 1 forward"]
    assert len(servers) == len(steps)
