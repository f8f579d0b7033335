"""What tracing costs: decode tokens/s with tracing on vs off, side by side in one run.

    .venv/bin/python bench/tracing_overhead.py                    # both sections, a few minutes
    .venv/bin/python bench/tracing_overhead.py --only store --rounds 3 --max-tokens 24

One 2-worker loopback pipeline (``mlx-relay worker`` processes, bundled model) and, over the
same workers, two coordinators: one with tracing on, one with ``tracing.enabled: false``.
Rounds alternate between them (round 0 warms up and is not counted); each round runs
``--streams`` requests at once and measures their aggregate decode tokens/s.

Sections:
  cost   CPU time the coordinator's tracing adds per request and step (a micro-batch of 16
         through StepTrace, the timelines, a trace document at the end), without and with an
         OpenTelemetry tracer (BatchSpanProcessor, an exporter that drops the spans), and a
         worker's spans per traced entry: figures that do not depend on how busy the
         machine is, to set against a decode step's time.
  store  The built-in trace store only (the default: no OpenTelemetry spans anywhere).
  otlp   Every process also makes OpenTelemetry spans and exports them over OTLP/HTTP to a
         receiver in this process (the workers are started with ``tracing.otlp_endpoint``;
         the "off" coordinator sends no trace context, so they make no spans for it).

Prints each side's median and the ratio on / off (target >= 0.98).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper who finds a map."


async def _round(orchestrator: Any, streams: int, max_tokens: int) -> float:
    """Aggregate decode tokens/s of ``streams`` requests run at once."""
    from mlx_relay.coordinator.requests import InferenceRequest

    requests = [
        InferenceRequest(prompt=f"{PROMPT} ({i})", max_tokens=max_tokens) for i in range(streams)
    ]
    started = time.perf_counter()
    responses = await asyncio.gather(*(orchestrator.process_request(r) for r in requests))
    wall = time.perf_counter() - started
    first_tokens = max(r.timings.ttft or 0.0 for r in responses)
    generated = sum(max(0, r.usage.completion_tokens - 1) for r in responses)
    decode = wall - first_tokens
    return generated / decode if decode > 0 else 0.0


async def _section(name: str, rounds: int, streams: int, max_tokens: int) -> float | None:
    sys.path.insert(0, str(ROOT))
    from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
    from mlx_relay.core.config import ModelConfig
    from mlx_relay.core.tracing_config import TracingConfig
    from mlx_relay.model.load import resolve_model_dir
    from tests.support.cluster import process_cluster
    from tests.support.otlp_receiver import otlp_receiver

    model_dir = resolve_model_dir(ModelConfig(), progress=False)
    print(
        f"\n== {name}: 2 workers, bundled model, {rounds} alternating rounds of "
        f"{streams} stream(s) x {max_tokens} tokens =="
    )
    async with otlp_receiver() as receiver:
        tracing = {"otlp_endpoint": receiver.url} if name == "otlp" else {}
        with tempfile.TemporaryDirectory() as work_dir:
            async with process_cluster(
                model_dir, Path(work_dir), 2, tracing=tracing, inference={"max_batch_size": 16}
            ) as cluster:
                traced = cluster.orchestrator
                config = cluster.config.model_copy(update={"tracing": TracingConfig(enabled=False)})
                untraced = DistributedOrchestrator(config, enable_monitoring=False)
                await untraced.initialize()
                speeds: dict[bool, list[float]] = {True: [], False: []}
                try:
                    for index in range(rounds + 1):
                        order = (True, False) if index % 2 else (False, True)
                        for on in order:
                            orchestrator = traced if on else untraced
                            speed = await _round(orchestrator, streams, max_tokens)
                            if index:
                                speeds[on].append(speed)
                finally:
                    await untraced.shutdown()
                kept = len(traced.traces) if traced.traces is not None else 0
        spans = len(receiver.spans)
    on, off = statistics.median(speeds[True]), statistics.median(speeds[False])
    ratio = on / off if off else None
    # Each round's on and off ran back to back: their ratio cancels slower drifts in load.
    paired = [a / b for a, b in zip(speeds[True], speeds[False], strict=True) if b]
    print(f"decode tok/s, tracing on   median {on:8.2f}  runs {_runs(speeds[True])}")
    print(f"decode tok/s, tracing off  median {off:8.2f}  runs {_runs(speeds[False])}")
    print(f"traces kept {kept}, spans received over OTLP {spans}")
    if ratio is not None:
        print(f"ratio of the medians, on / off   {ratio:.3f}  (target >= 0.98)")
    if paired:
        print(f"median of the rounds' ratios     {statistics.median(paired):.3f}  {_runs(paired)}")
    return ratio


def cost_section(steps: int = 200, batch: int = 16) -> None:
    """Microseconds of tracing work per request per step (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from mlx_relay.coordinator.prepare import PreparedRequest
    from mlx_relay.coordinator.requests import InferenceRequest
    from mlx_relay.coordinator.scheduler import ScheduledStep, StepPlan
    from mlx_relay.coordinator.tracing import CoordinatorTracing, StepTrace
    from mlx_relay.core.tracing import tracer_of
    from mlx_relay.model.sampling import SamplingParams
    from mlx_relay.monitoring.traces import TraceStore, trace_document
    from mlx_relay.proto import relay_pb2 as pb
    from mlx_relay.worker.tracing import ForwardSpans

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    tracer = tracer_of(provider)
    timings = [
        pb.StageTiming(device_id=f"worker-{i}", compute_seconds=0.01, handled_seconds=0.02)
        for i in range(2)
    ]
    print(f"\n== cost: {steps} steps of a {batch}-request micro-batch, 2 stages ==")
    for label, with_tracer in (("store only", None), ("store + OpenTelemetry", tracer)):
        tracing = CoordinatorTracing(TraceStore(1000), with_tracer, "coordinator")
        tracing.attach("model", ["worker-0", "worker-1"])
        now = time.monotonic()
        runs = [
            tracing.open(
                PreparedRequest(InferenceRequest(prompt="x"), [1, 2, 3], SamplingParams(), 8, now)
            )
            for _ in range(batch)
        ]
        started = time.process_time()
        for index in range(steps):
            plan = StepPlan(
                index, tuple(ScheduledStep(str(k), "decode", 3 + index, 1) for k in range(batch))
            )
            trace = StepTrace(plan)
            for run, step in zip(runs, plan.steps, strict=True):
                trace.join(run, step)
            trace.answered(time.monotonic(), time.monotonic(), timings)
            trace.close()
        for run in runs:
            run.admitted(now)
            run.finish(time.monotonic(), "length", steps)
            tracing.close(run)
        documents = time.process_time()
        for run in runs:
            trace_document(run.timeline)
        done = time.process_time()
        per = (documents - started) / (steps * batch) * 1e6
        build = (done - documents) / (steps * batch) * 1e6
        print(f"coordinator, {label:22s} {per:6.1f} us per request-step while running")
        print(
            f"  its trace document on GET {build:6.1f} us per request-step (off the request path)"
        )
    request = pb.ForwardRequest(
        entries=[
            pb.ForwardEntry(request_id=str(k), traceparent=f"00-{k + 1:032x}-{k + 1:016x}-01")
            for k in range(batch)
        ]
    )
    timing = pb.StageTiming(compute_seconds=0.01, check_seconds=0.001, encode_seconds=0.001)
    assert tracer is not None
    started = time.process_time()
    for _ in range(steps):
        spans = ForwardSpans(tracer, "worker-0", 0, request, "", time.perf_counter())
        spans.hop_parents("worker-1")
        spans.finish(timing)
    per = (time.process_time() - started) / (steps * batch) * 1e6
    print(f"worker with OTLP export        {per:6.1f} us per traced entry and stage")
    provider.shutdown()


def _runs(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=["cost", "store", "otlp"])
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds per side")
    parser.add_argument("--streams", type=int, default=4, help="requests at once per round")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    args = parser.parse_args()
    for name in args.only or ["cost", "store", "otlp"]:
        if name == "cost":
            cost_section()
        else:
            asyncio.run(_section(name, args.rounds, args.streams, args.max_tokens))


if __name__ == "__main__":
    main()
