"""Per-request traces across the pipeline: timelines, attribution, the in-memory store, the
waterfall document and its Chrome trace-event form (docs/monitoring-api.md, "Traces")."""

from mlx_relay.monitoring.traces.attribution import Attribution, attribute
from mlx_relay.monitoring.traces.chrome import chrome_trace
from mlx_relay.monitoring.traces.spans import trace_document
from mlx_relay.monitoring.traces.store import TraceArchive, TraceStore, summary_of
from mlx_relay.monitoring.traces.timeline import (
    RequestStep,
    RequestTimeline,
    StageTimes,
    StepRecord,
)

__all__ = [
    "Attribution",
    "RequestStep",
    "RequestTimeline",
    "StageTimes",
    "StepRecord",
    "TraceArchive",
    "TraceStore",
    "attribute",
    "chrome_trace",
    "summary_of",
    "trace_document",
]
