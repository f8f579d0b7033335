"""``GET /api/devices``: the cluster view in pipeline order."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_relay.monitoring.api.deps import SnapshotDep
from mlx_relay.monitoring.api.views import DevicesResponse, devices_view

router = APIRouter(tags=["monitoring"])


@router.get("/api/devices", response_model=DevicesResponse, summary="Devices and links")
def get_devices(snapshot: SnapshotDep) -> DevicesResponse:
    """Every device (coordinator, then workers by stage) with its role, layers, health,
    reachability, last-seen time and latest CPU, memory, GPU and MLX memory sample; and each
    network link's round trip, bytes and last error."""
    return devices_view(snapshot)
