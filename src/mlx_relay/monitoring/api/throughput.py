"""``GET /api/throughput``: request and token rates, now and over the chart history."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_relay.monitoring.api.deps import SnapshotDep
from mlx_relay.monitoring.api.views import ThroughputResponse, throughput_view

router = APIRouter(tags=["monitoring"])


@router.get("/api/throughput", response_model=ThroughputResponse, summary="Throughput")
def get_throughput(snapshot: SnapshotDep) -> ThroughputResponse:
    """Requests/s and tokens/s over the last 10 s at the top level, both windows (10 s and
    60 s) with error rates, and one history point per collection interval for charts."""
    return throughput_view(snapshot)
