"""Response models of the history API (``/api/history*``, ``/api/requests``)."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, Field

from mlx_relay.monitoring.history.series import SeriesSpec


class SeriesInfo(BaseModel):
    """One stored series."""

    key: str = Field(description="Series key: sample name and labels, or chart.<line>.")
    family: str = Field(description="Metric family (sample name) or chart line.")
    labels: dict[str, str] = Field(description="Label pairs of the series.")
    kind: str = Field(description="gauge or counter (a counter reads as a per-second rate).")
    unit: str = Field(description="Unit of what /api/history returns (e.g. ratio, bytes/s).")

    @classmethod
    def of(cls, spec: SeriesSpec, **extra: Any) -> Self:
        return cls(
            key=spec.key,
            family=spec.family,
            labels=dict(spec.labels),
            kind=spec.kind,
            unit=spec.read_unit,
            **extra,
        )


class HistorySeries(SeriesInfo):
    values: list[float | None] = Field(
        description="One value per timestamp; null where nothing was stored (a gap)."
    )


class HistoryResponse(BaseModel):
    """``GET /api/history``: series regrouped into ``points`` buckets of ``step_seconds``."""

    after: float = Field(description="Start of the range, unix seconds (inclusive).")
    before: float = Field(description="End of the range, unix seconds (exclusive).")
    points: int = Field(description="Buckets returned (at most the points asked).")
    step_seconds: float = Field(description="Width of each bucket, seconds.")
    group: str = Field(description="How samples in a bucket combine: avg|min|max|sum.")
    tier: int = Field(description="Tier read (0 = raw samples).")
    tier_interval_seconds: float = Field(description="Resolution of that tier, seconds.")
    timestamps: list[float] = Field(description="Start of each bucket, unix seconds.")
    series: list[HistorySeries]


class TierInfo(BaseModel):
    index: int = Field(description="0 = raw samples; then count/sum/min/max rollups.")
    interval_seconds: float = Field(description="Seconds per point (raw: the collection interval).")
    retention_seconds: float = Field(description="How long points are kept.")


class CatalogEntry(SeriesInfo):
    stored_unit: str = Field(description="Unit of the stored value (a counter's own unit).")


class StoreStatus(BaseModel):
    path: str = Field(description="The store's file.")
    bytes: int = Field(description="Database pages in use, bytes (max_bytes caps it).")
    max_bytes: int = Field(description="The configured cap, bytes.")
    block_rows: int = Field(description="Rows of packed samples.")
    request_rows: int = Field(description="Requests in the request log.")
    series: int = Field(description="Series kept.")
    samples_written: int = Field(description="Samples packed since start.")
    dropped: int = Field(description="Samples and requests dropped (writer behind).")
    write_lag_seconds: float | None = Field(
        description="Oldest sample's wait from recording to commit at the last write, seconds."
    )
    flush_interval_seconds: float = Field(description="Seconds between the writer's commits.")


class SeriesCatalogResponse(BaseModel):
    """``GET /api/history/series``: every stored series, the tiers and the store's state."""

    tiers: list[TierInfo]
    series: list[CatalogEntry]
    store: StoreStatus


class RequestLogEntry(BaseModel):
    """One finished request: timings and token counts, never prompt or completion text."""

    request_id: str
    arrival: float = Field(description="Arrival, unix seconds.")
    status: str = Field(description="ok|aborted|error.")
    finish_reason: str | None = Field(description="stop|length|abort, for finished requests.")
    error_type: str | None = Field(description="Error class of a failed request.")
    queue_seconds: float | None = Field(description="Wait before prefill, seconds.")
    ttft_seconds: float | None = Field(description="Arrival to first token, seconds.")
    e2e_seconds: float = Field(description="Arrival to the end, seconds.")
    prompt_tokens: int
    generated_tokens: int
    stage_seconds: dict[str, float] = Field(description="Compute time per stage's device, s.")
    network_seconds: float = Field(description="Time on the network, seconds.")


class RequestLogResponse(BaseModel):
    """``GET /api/requests``: one page of the request log."""

    total: int = Field(description="Requests matching the filters, in all.")
    limit: int
    offset: int
    order: str = Field(description="newest|oldest|slowest|fastest.")
    requests: list[RequestLogEntry]
