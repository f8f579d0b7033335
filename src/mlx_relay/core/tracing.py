"""OpenTelemetry glue shared by the coordinator and the workers.

Nothing here touches OpenTelemetry's global tracer provider: each process builds its own
(:func:`otlp_tracer_provider`, when ``tracing.otlp_endpoint`` is set) or is handed one (tests
pass a local ``TracerProvider``), and spans go only where that provider sends them. Spans
are made after the fact with explicit times (:func:`epoch_ns` turns this process's
monotonic clock into the unix nanoseconds OpenTelemetry wants), so the request path pays
for a few objects, never a wait: the exporter sends them in batches on its own thread.

W3C trace context travels as a ``traceparent`` string (:func:`traceparent`,
:func:`parent_context`): in gRPC metadata, and in each Forward entry, because one call
carries many requests, each in its own trace.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanContext, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mlx_relay import __version__
from mlx_relay.core.tracing_config import TracingConfig

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
INSTRUMENTATION_NAME = "mlx_relay"
SERVICE_NAMESPACE = "mlx-relay"
_PROPAGATOR = TraceContextTextMapPropagator()
# Unix time minus monotonic time, in nanoseconds, taken once: spans of one process share it.
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def epoch_ns(monotonic_seconds: float) -> int:
    """Unix nanoseconds of a ``time.monotonic()`` (or ``perf_counter()``) reading."""
    return _EPOCH_OFFSET_NS + int(monotonic_seconds * 1e9)


def otlp_tracer_provider(
    config: TracingConfig, service_name: str, instance_id: str
) -> TracerProvider | None:
    """A provider exporting to ``config.otlp_endpoint`` over OTLP/HTTP in batches (a
    ``BatchSpanProcessor``: the request path never waits on the network), or None when no
    endpoint is set or tracing is off."""
    if not config.enabled or not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": service_name,
            "service.namespace": SERVICE_NAMESPACE,
            "service.instance.id": instance_id,
            "service.version": __version__,
        }
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.otlp_timeout)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    logger.info("exporting spans of %s over OTLP/HTTP to %s", instance_id, config.otlp_endpoint)
    return provider


def tracer_of(provider: Any | None) -> Tracer | None:
    """The mlx-relay tracer of ``provider`` (an SDK ``TracerProvider``), or None."""
    if provider is None:
        return None
    tracer: Tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
    return tracer


async def shutdown_provider(provider: Any | None) -> None:
    """Flush and stop a provider this process built (its exporter's last batch)."""
    if provider is None:
        return
    import asyncio

    try:
        await asyncio.to_thread(provider.shutdown)
    except Exception:
        logger.warning("tracer provider did not shut down cleanly", exc_info=True)


def traceparent(span_context: SpanContext) -> str:
    """The W3C ``traceparent`` of a span context."""
    flags = int(span_context.trace_flags)
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags:02x}"


def parent_context(value: str) -> Context | None:
    """The context a ``traceparent`` string names, or None when it is empty or invalid."""
    if not value:
        return None
    context = _PROPAGATOR.extract({TRACEPARENT: value})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def span_context_of(value: str) -> SpanContext | None:
    """The remote span context of a ``traceparent`` string, or None."""
    context = parent_context(value)
    if context is None:
        return None
    return trace.get_current_span(context).get_span_context()


def in_context(span: Span) -> Context:
    return trace.set_span_in_context(span)
