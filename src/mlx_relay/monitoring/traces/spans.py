"""A request's waterfall as JSON: its spans, lanes and time attribution (pure functions).

``GET /api/requests/{id}/trace`` answers :func:`trace_document`; docs/monitoring-api.md
describes the shape. Span times are seconds from the request's arrival. The coordinator's
spans keep the ids they had in OpenTelemetry (when it recorded them); the stages' spans are
rebuilt from the timings each stage returned with its answer, under ids derived from the
step's span, so the same trace gets the same ids every time.
"""

from __future__ import annotations

from typing import Any

from mlx_relay.monitoring.traces.attribution import CallSplit, attribute, split_call
from mlx_relay.monitoring.traces.timeline import RequestStep, RequestTimeline, stage_lane

COORDINATOR_LANE = "coordinator"
_MASK = (1 << 64) - 1


def span_hex(span_id: int) -> str:
    return f"{span_id:016x}"


def trace_hex(trace_id: int) -> str:
    return f"{trace_id:032x}"


def derived_id(parent: int, k: int) -> int:
    """A stable span id for the ``k``-th span rebuilt under span ``parent``."""
    return ((parent * 31 + k + 1) * 0x9E3779B97F4A7C15) & _MASK or 1


def genai_attributes(timeline: RequestTimeline) -> dict[str, Any]:
    """The request's OpenTelemetry GenAI attributes (``gen_ai.*``) and its own
    (``mlx_relay.*``): usage, finish reason, time to first token and per output token."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": timeline.operation,
        "gen_ai.request.model": timeline.model,
        "gen_ai.response.model": timeline.model,
        "gen_ai.usage.input_tokens": timeline.prompt_tokens,
        "gen_ai.usage.output_tokens": timeline.output_tokens,
        "mlx_relay.request.id": timeline.request_id,
    }
    if timeline.finish_reason is not None:
        attributes["gen_ai.response.finish_reasons"] = [timeline.finish_reason]
    if timeline.error_type is not None:
        attributes["error.type"] = timeline.error_type
    if timeline.first_token is not None:
        ttft = timeline.first_token - timeline.arrival
        attributes["gen_ai.server.time_to_first_token"] = ttft
        if timeline.output_tokens > 1 and timeline.finished is not None:
            decode = timeline.finished - timeline.first_token
            attributes["gen_ai.server.time_per_output_token"] = decode / (
                timeline.output_tokens - 1
            )
    return attributes


def step_attributes(step: RequestStep) -> dict[str, Any]:
    record = step.record
    return {
        "mlx_relay.step.phase": step.phase,
        "mlx_relay.step.position": step.position,
        "mlx_relay.step.length": step.length,
        "mlx_relay.step.plan_id": record.plan_id,
        "mlx_relay.batch.size": record.batch_size,
        "mlx_relay.batch.decode_rows": record.decode_rows,
        "mlx_relay.batch.prefill_tokens": record.prefill_tokens,
    }


def step_name(step: RequestStep) -> str:
    return "prefill chunk" if step.phase == "prefill" else "decode step"


class _Spans:
    """Collects spans with times relative to the request's arrival."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.items: list[dict[str, Any]] = []

    def add(
        self,
        span_id: int,
        parent: int | None,
        name: str,
        lane: str,
        start: float,
        end: float,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self.items.append(
            {
                "span_id": span_hex(span_id),
                "parent_id": span_hex(parent) if parent is not None else None,
                "name": name,
                "lane": lane,
                "start_s": start - self.origin,
                "duration_s": max(0.0, end - start),
                "attributes": attributes or {},
            }
        )


def trace_document(timeline: RequestTimeline) -> dict[str, Any]:
    """The whole trace of one request (the ``/api/requests/{id}/trace`` answer)."""
    finished = timeline.finished if timeline.finished is not None else timeline.arrival
    spans = _Spans(timeline.arrival)
    root = timeline.root_span_id
    spans.add(
        root,
        None,
        f"{timeline.operation} {timeline.model}",
        COORDINATOR_LANE,
        timeline.arrival,
        finished,
        genai_attributes(timeline),
    )
    prepared = timeline.prepared or timeline.arrival
    spans.add(derived_id(root, 0), root, "tokenize", COORDINATOR_LANE, timeline.arrival, prepared)
    admitted = timeline.admitted if timeline.admitted is not None else finished
    spans.add(derived_id(root, 1), root, "admission wait", COORDINATOR_LANE, prepared, admitted)
    for step in timeline.steps:
        if step.record.started >= finished:
            break
        _step_spans(spans, timeline, step, min(step.record.ended or finished, finished))
    return {
        "request_id": timeline.request_id,
        "trace_id": trace_hex(timeline.trace_id),
        "start_unix": timeline.start_unix,
        "duration_s": finished - timeline.arrival,
        "model": timeline.model,
        "status": _status(timeline),
        "finish_reason": timeline.finish_reason,
        "prompt_tokens": timeline.prompt_tokens,
        "output_tokens": timeline.output_tokens,
        "spans": spans.items,
        "lanes": timeline.lanes,
        "attribution": attribute(timeline).as_dict(),
    }


def _status(timeline: RequestTimeline) -> str:
    if timeline.error_type is not None:
        return "error"
    if timeline.finish_reason == "abort":
        return "aborted"
    return "ok" if timeline.finished is not None else "running"


def _step_spans(spans: _Spans, timeline: RequestTimeline, step: RequestStep, end: float) -> None:
    record = step.record
    attributes = step_attributes(step)
    if record.error is not None:
        attributes["error.type"] = record.error
    spans.add(
        step.span_id,
        timeline.root_span_id,
        step_name(step),
        COORDINATOR_LANE,
        record.started,
        end,
        attributes,
    )
    if not record.sent:
        return
    first = timeline.stages[0] if timeline.stages else "worker"
    received = record.received or end
    spans.add(
        step.hop_span_id,
        step.span_id,
        f"Forward {first}",
        COORDINATOR_LANE,
        record.sent,
        received,
        {"rpc.system": "grpc", "rpc.method": "Forward", "server.address": first},
    )
    if not record.received or not record.stages:
        return
    splits = split_call(record.received - record.sent, record.stages)
    caller = step.hop_span_id
    for index, (split, link) in enumerate(zip(splits, timeline.links, strict=False)):
        following = splits[index + 1] if index + 1 < len(splits) else None
        caller = _stage_spans(
            spans, record.sent, index, (split, following), link, caller, step.span_id
        )


def _stage_spans(
    spans: _Spans,
    sent: float,
    index: int,
    pair: tuple[CallSplit, CallSplit | None],
    link: str,
    caller: int,
    step_span: int,
) -> int:
    """One stage's spans in one step and its link's; returns the id of its call to the next
    stage (the next stage's parent)."""
    split, following = pair
    stage = split.stage
    base = derived_id(step_span, 16 * (index + 1))
    server = derived_id(base, 0)
    lane = stage_lane(index, split.device_id)
    begin, end = sent + split.begin, sent + split.end
    call_begin, call_end = sent + split.call_begin, sent + split.call_begin + split.call
    link_lane = f"link {link}"
    waited = begin - stage.chain_wait
    spans.add(derived_id(base, 1), caller, "send", link_lane, call_begin, waited)
    if stage.chain_wait > 0:
        spans.add(derived_id(base, 9), caller, "wait for the step before", lane, waited, begin)
    spans.add(derived_id(base, 2), caller, "reply", link_lane, end, call_end)
    spans.add(
        server,
        caller,
        f"stage {index} forward",
        lane,
        begin,
        end,
        {
            "mlx_relay.stage.index": index,
            "mlx_relay.stage.device": split.device_id,
            "mlx_relay.stage.queue_s": stage.queue,
            "mlx_relay.stage.compute_s": stage.compute,
        },
    )
    cursor = begin
    if stage.check > 0:
        spans.add(derived_id(base, 3), server, "check", lane, cursor, cursor + stage.check)
        cursor += stage.check
    if stage.queue > 0:
        spans.add(derived_id(base, 4), server, "queue wait", lane, cursor, cursor + stage.queue)
        cursor += stage.queue
    compute = derived_id(base, 5)
    spans.add(compute, server, "compute", lane, cursor, cursor + stage.compute)
    tail = cursor + stage.compute
    if stage.encode > 0:
        spans.add(derived_id(base, 6), compute, "encode", lane, tail - stage.encode, tail)
    if stage.sample > 0:
        spans.add(derived_id(base, 7), compute, "sample", lane, tail - stage.sample, tail)
    hop = derived_id(base, 8)
    if following is not None:
        hop_begin = sent + following.call_begin
        spans.add(
            hop,
            server,
            f"Forward {following.device_id}",
            lane,
            hop_begin,
            hop_begin + following.call,
            {"rpc.system": "grpc", "rpc.method": "Forward", "server.address": following.device_id},
        )
    return hop
