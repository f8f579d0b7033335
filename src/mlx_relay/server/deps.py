"""What the coordinator's routes share: the services the app was built with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request, status

from mlx_relay.core.config import ClusterConfig

if TYPE_CHECKING:
    from mlx_relay.coordinator.orchestrator import DistributedOrchestrator


@dataclass
class AppServices:
    """Everything the HTTP app serves from, built once at start-up.

    Attributes:
        config: the cluster configuration.
        orchestrator: the running pipeline; None for a standalone dashboard.
        metrics_collector: the coordinator's MetricsCollector, or None without monitoring.
        health_monitor: the coordinator's HealthMonitor, or None without monitoring.
        alert_engine: the coordinator's AlertEngine, or None with alerting or monitoring off.
        history: the coordinator's HistoryRecorder (its ``store`` serves /api/history), or
            None when history is off.
        placement: the placement advisor's inputs (``PlacementSource``), with monitoring.
        rebalancer: runs live repartitions (``Rebalancer``), with monitoring and a pipeline.
    """

    config: ClusterConfig
    orchestrator: DistributedOrchestrator | None = None
    metrics_collector: Any | None = None
    health_monitor: Any | None = None
    alert_engine: Any | None = None
    history: Any | None = None
    placement: Any | None = None
    rebalancer: Any | None = None


def get_services(request: Request) -> AppServices:
    """The :class:`AppServices` that ``create_app`` stored on the app."""
    services: AppServices | None = getattr(request.app.state, "services", None)
    if services is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the server is starting",
            headers={"Retry-After": "1"},
        )
    return services


ServicesDep = Annotated[AppServices, Depends(get_services)]
