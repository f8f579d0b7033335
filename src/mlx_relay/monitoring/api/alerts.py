"""``GET /api/alerts``: firing, pending and recently resolved alerts, rules and receivers."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_relay.monitoring.alerting.views import AlertsView
from mlx_relay.monitoring.api.deps import ContextDep

router = APIRouter(tags=["monitoring"])


@router.get("/api/alerts", response_model=AlertsView, summary="Alerts")
def get_alerts(context: ContextDep) -> AlertsView:
    """Firing alerts (most severe first), pending ones (waiting for their rule's ``for``),
    the last resolved ones, every rule with its PromQL and every notification destination
    with its sent/failed/dropped counts. With alerting off, ``enabled`` is false."""
    return context.alerts_view()
