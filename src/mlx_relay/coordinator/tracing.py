"""The coordinator's side of per-request tracing.

:class:`CoordinatorTracing` (one per orchestrator) opens a :class:`RequestSpans` per request:
its :class:`~mlx_relay.monitoring.traces.RequestTimeline` for the built-in trace store and,
when the coordinator has a tracer provider, its OpenTelemetry spans (the request's root span
with the GenAI attributes, tokenize, admission wait, and a span per step it takes with the
call to the first stage under it). A micro-batch serves many requests: :class:`StepTrace` is
one micro-batch's record, shared by the timelines of all its requests, and each request gets
its own step span in its own trace, whose context its entry carries to the stages
(``ForwardEntry.traceparent``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from mlx_relay.coordinator.prepare import PreparedRequest
from mlx_relay.coordinator.scheduler import ScheduledStep, StepPlan
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.tracing import (
    epoch_ns,
    in_context,
    otlp_tracer_provider,
    traceparent,
    tracer_of,
)
from mlx_relay.monitoring.traces import (
    RequestStep,
    RequestTimeline,
    StageTimes,
    StepRecord,
    TraceStore,
)
from mlx_relay.monitoring.traces.spans import (
    derived_id,
    genai_attributes,
    step_attributes,
    step_name,
)
from mlx_relay.proto import relay_pb2


def _random_id(bits: int) -> int:
    return random.getrandbits(bits) or 1


class _TracedStep:
    """One request's part of one micro-batch: its timeline entry, the ``traceparent`` its
    Forward entry carries, and its live spans (step, call to the first stage), if any."""

    __slots__ = ("parent", "spans", "step")

    def __init__(self, step: RequestStep, parent: str, spans: tuple[Span, Span] | None) -> None:
        self.step = step
        self.parent = parent
        self.spans = spans

    def end(self, error: str | None) -> None:
        if self.spans is None:
            return
        span, hop = self.spans
        record = self.step.record
        if error is not None:
            for one in (hop, span):
                one.set_status(Status(StatusCode.ERROR, error))
                one.set_attribute("error.type", error)
        hop.end(end_time=epoch_ns(record.received or record.ended))
        span.end(end_time=epoch_ns(record.ended))


class RequestSpans:
    """One request's timeline and, with a tracer, its OpenTelemetry spans."""

    def __init__(self, timeline: RequestTimeline, tracer: Tracer | None, root: Span | None):
        self.timeline = timeline
        self._tracer = tracer
        self._root = root
        self._closed = False

    def admitted(self, now: float) -> None:
        timeline = self.timeline
        timeline.admitted = now
        if self._tracer is None or self._root is None:
            return
        context = in_context(self._root)
        for name, start, end in (
            ("tokenize", timeline.arrival, timeline.prepared),
            ("admission wait", timeline.prepared, now),
        ):
            span = self._tracer.start_span(name, context=context, start_time=epoch_ns(start))
            span.end(end_time=epoch_ns(end))

    def begin_step(self, record: StepRecord, step: ScheduledStep) -> _TracedStep:
        """The request's part of a micro-batch (its spans started, with a tracer)."""
        tracer, root = self._tracer, self._root
        request_step = RequestStep(record, step.phase, step.position, step.length, 0, 0)
        spans: tuple[Span, Span] | None = None
        if tracer is not None and root is not None:
            span = tracer.start_span(
                step_name(request_step),
                context=in_context(root),
                start_time=epoch_ns(record.started),
                attributes=step_attributes(request_step),
            )
            first = self.timeline.stages[0] if self.timeline.stages else "worker"
            hop = tracer.start_span(
                f"Forward {first}",
                context=in_context(span),
                kind=SpanKind.CLIENT,
                start_time=epoch_ns(time.monotonic()),
                attributes={"rpc.system": "grpc", "rpc.method": "Forward", "server.address": first},
            )
            spans = (span, hop)
            request_step.span_id = span.get_span_context().span_id
            request_step.hop_span_id = hop.get_span_context().span_id
            parent = traceparent(hop.get_span_context())
        else:
            request_step.span_id = _random_id(64)
            request_step.hop_span_id = derived_id(request_step.span_id, 0)
            parent = f"00-{self.timeline.trace_id:032x}-{request_step.hop_span_id:016x}-01"
        self.timeline.steps.append(request_step)
        return _TracedStep(request_step, parent, spans)

    def first_token(self, now: float) -> None:
        if self.timeline.first_token is None:
            self.timeline.first_token = now

    def finish(
        self, now: float, reason: str | None, output_tokens: int, error_type: str | None = None
    ) -> None:
        """The request ended (the last token handed out, failed or aborted)."""
        timeline = self.timeline
        if timeline.finished is not None:
            return
        timeline.finished = now
        timeline.finished_unix = time.time()
        timeline.finish_reason = reason
        timeline.output_tokens = output_tokens
        timeline.error_type = error_type

    def close(self, store: TraceStore | None) -> None:
        """Keep the timeline in ``store`` and end the root span (once)."""
        if self._closed:
            return
        self._closed = True
        timeline = self.timeline
        if timeline.finished is None:
            self.finish(time.monotonic(), "abort", timeline.output_tokens)
        if self._root is not None:
            root = self._root
            root.set_attributes(genai_attributes(timeline))
            if timeline.error_type is not None:
                root.set_status(Status(StatusCode.ERROR, timeline.error_type))
            root.end(end_time=epoch_ns(timeline.finished or time.monotonic()))
        if store is not None:
            store.add(timeline)


class StepTrace:
    """One micro-batch's record and its requests' parts of it (see the module docstring)."""

    def __init__(self, plan: StepPlan) -> None:
        self.record = StepRecord(
            plan.plan_id,
            len(plan.steps),
            plan.decode_count,
            plan.prefill_tokens,
            started=time.monotonic(),
        )
        self._steps: list[_TracedStep] = []

    def join(self, spans: RequestSpans | None, step: ScheduledStep) -> str:
        """Add a request's step; the ``traceparent`` of its entry (``""`` untraced)."""
        if spans is None:
            return ""
        traced = spans.begin_step(self.record, step)
        self._steps.append(traced)
        return traced.parent

    def answered(
        self, sent: float, received: float, stages: Sequence[relay_pb2.StageTiming]
    ) -> None:
        """The first stage answered: the call's times and every stage's own."""
        record = self.record
        record.sent, record.received = sent, received
        record.stages = stage_times(stages)

    def close(self, error: BaseException | None = None) -> None:
        """The micro-batch's tokens are handed out (or it failed): end its spans."""
        record = self.record
        record.ended = time.monotonic()
        name = type(error).__name__ if error is not None else None
        record.error = name
        for traced in self._steps:
            traced.end(name)


def stage_times(timings: Sequence[relay_pb2.StageTiming]) -> tuple[StageTimes, ...]:
    """Each stage's own times from an answer's ``stages`` (a stage's relay offset is what
    the next stage's timing says of when it was called)."""
    return tuple(
        StageTimes(
            device_id=timing.device_id,
            call=timing.rpc_seconds,
            compute=timing.compute_seconds,
            handler=timing.handled_seconds,
            check=timing.check_seconds,
            queue=timing.queue_seconds,
            encode=timing.encode_seconds,
            sample=timing.sample_seconds,
            chain_wait=timing.chain_wait_seconds,
            relay_offset=(
                timings[index + 1].called_offset_seconds if index + 1 < len(timings) else 0.0
            ),
        )
        for index, timing in enumerate(timings)
    )


class CoordinatorTracing:
    """Opens each request's :class:`RequestSpans`; keeps finished ones in :attr:`store`.

    Args:
        store: the trace store (the last N traces), or None to keep none.
        tracer: the coordinator's OpenTelemetry tracer, or None for no spans.
        coordinator: the coordinator's device id (the first link's name).
    """

    def __init__(self, store: TraceStore | None, tracer: Tracer | None, coordinator: str) -> None:
        self.store = store
        self.tracer = tracer
        self.coordinator = coordinator
        self.model = ""
        self.stages: tuple[str, ...] = ()

    @classmethod
    def from_config(
        cls, config: ClusterConfig, tracer_provider: Any | None
    ) -> tuple[CoordinatorTracing | None, Any | None]:
        """The coordinator's tracing under ``tracing.enabled`` (else None), keeping the last
        ``tracing.max_traces`` traces, its spans going to ``tracer_provider``, by default to
        one exporting to ``tracing.otlp_endpoint``; and that default provider, which the
        caller shuts down (None when one was given or tracing is off)."""
        tracing = config.tracing
        if not tracing.enabled:
            return None, None
        owned = None
        if tracer_provider is None:
            tracer_provider = owned = otlp_tracer_provider(
                tracing, "mlx-relay-coordinator", config.coordinator_id
            )
        store = TraceStore(tracing.max_traces, max_steps=tracing.max_steps)
        return cls(store, tracer_of(tracer_provider), config.coordinator_id), owned

    def attach(self, model: str, stages: Sequence[str]) -> None:
        """The pipeline is known: its model and its stages' ids in order."""
        self.model = model
        self.stages = tuple(stages)

    def open(self, prepared: PreparedRequest) -> RequestSpans:
        request = prepared.request
        operation = "chat" if request.messages is not None else "text_completion"
        root: Span | None = None
        if self.tracer is not None:
            root = self.tracer.start_span(
                f"{operation} {self.model}",
                kind=SpanKind.SERVER,
                start_time=epoch_ns(prepared.submitted_at),
                attributes=_request_attributes(operation, self.model, prepared),
            )
            context = root.get_span_context()
            trace_id, root_id = context.trace_id, context.span_id
        else:
            trace_id, root_id = _random_id(128), _random_id(64)
        now, wall = time.monotonic(), time.time()
        timeline = RequestTimeline(
            request_id=request.request_id,
            trace_id=trace_id,
            root_span_id=root_id,
            model=self.model,
            operation=operation,
            coordinator=self.coordinator,
            stages=self.stages,
            arrival=prepared.submitted_at,
            start_unix=wall - (now - prepared.submitted_at),
            prompt_tokens=len(prepared.prompt_ids),
            prepared=prepared.prepared_at,
        )
        return RequestSpans(timeline, self.tracer, root)

    def close(self, spans: RequestSpans) -> None:
        spans.close(self.store)


def _request_attributes(operation: str, model: str, prepared: PreparedRequest) -> dict[str, Any]:
    params = prepared.params
    return {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": prepared.max_tokens,
        "gen_ai.request.temperature": float(params.temperature),
        "gen_ai.request.top_p": float(params.top_p),
        "gen_ai.usage.input_tokens": len(prepared.prompt_ids),
        "mlx_relay.request.id": prepared.request.request_id,
    }
