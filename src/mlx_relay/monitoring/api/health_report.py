"""``GET /api/health``, the health report: this process's health checks plus every device's
status. (The readiness probe for load balancers is the server's ``GET /health``.)"""

from __future__ import annotations

from fastapi import APIRouter

from mlx_relay.monitoring.api.deps import ContextDep
from mlx_relay.monitoring.api.views import ClusterHealth

router = APIRouter(tags=["monitoring"])


@router.get("/api/health", response_model=ClusterHealth, summary="Health summary")
def get_health_report(context: ContextDep) -> ClusterHealth:
    """Each local check's status and message, recent transitions, and each device's status
    (a device that stopped answering counts as critical). ``overall_status`` is the worst."""
    return context.cluster_health()
