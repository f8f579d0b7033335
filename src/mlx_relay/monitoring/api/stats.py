"""``GET /api/stats``: request totals, latency percentiles, errors and per-stage compute."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_relay.monitoring.api.deps import SnapshotDep
from mlx_relay.monitoring.api.views import StatsResponse, stats_view

router = APIRouter(tags=["monitoring"])


@router.get("/api/stats", response_model=StatsResponse, summary="Inference statistics")
def get_stats(snapshot: SnapshotDep) -> StatsResponse:
    """p50/p90/p99 of end-to-end latency, TTFT, inter-token latency and time per output
    token (seconds), request and token totals, error rates, each stage's compute (the
    bottleneck flagged) and the recent errors (type and message only, never request text)."""
    return stats_view(snapshot)
