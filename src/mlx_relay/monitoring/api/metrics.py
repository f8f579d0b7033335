"""``GET /api/metrics``: the complete snapshot."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_relay.monitoring.api.deps import SnapshotDep
from mlx_relay.monitoring.snapshot import Snapshot

router = APIRouter(tags=["monitoring"])


@router.get("/api/metrics", response_model=Snapshot, summary="Complete metrics snapshot")
def get_metrics(snapshot: SnapshotDep) -> Snapshot:
    """Everything this process knows: devices, requests, stages, links and chart history.

    The same snapshot ``/metrics`` exposes to Prometheus. Units: seconds, bytes, ratios in
    0..1, unix-second timestamps; an unmeasurable quantity is null with a ``*_reason``.
    """
    return snapshot
