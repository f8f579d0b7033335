"""Adds the monitoring routes to an app: the composition root of the monitoring HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from prometheus_client.registry import CollectorRegistry

from mlx_relay.core.config import HTTPConfig
from mlx_relay.core.http_access import (
    install_access,
    rate_limit,
    require_metrics_token,
    require_page_token,
    require_token,
)
from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.alerting.exposition import AlertsCollector
from mlx_relay.monitoring.api import alerts as alert_routes
from mlx_relay.monitoring.api import (
    devices,
    exposition,
    health_report,
    metrics,
    page,
    stats,
    throughput,
)
from mlx_relay.monitoring.api import ws as ws_routes
from mlx_relay.monitoring.api.context import MonitoringContext
from mlx_relay.monitoring.api.deps import STATE_ATTRIBUTE
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector
from mlx_relay.monitoring.prometheus import RelayCollector

if TYPE_CHECKING:
    from mlx_relay.monitoring.history import HistoryStore
    from mlx_relay.monitoring.traces import TraceStore

API_ROUTERS = (
    metrics.router,
    health_report.router,
    devices.router,
    throughput.router,
    stats.router,
    alert_routes.router,
)


def mount_monitoring(
    app: FastAPI,
    metrics_collector: MetricsCollector,
    health_monitor: HealthMonitor | None,
    settings: HTTPConfig,
    *,
    registry: CollectorRegistry | None = None,
    update_interval: float | None = None,
    alerts: AlertEngine | None = None,
    history: HistoryStore | None = None,
    traces: TraceStore | None = None,
) -> MonitoringContext:
    """Serve ``/``, ``/static``, ``/api/*``, ``/ws`` and ``/metrics`` from ``app``.

    ``/``, ``/api/*`` and ``/ws`` require ``settings.auth_token`` when set (``?token=`` is
    accepted by ``/`` and ``/ws`` only); ``/api/*`` is rate
    limited per client; ``/metrics`` follows ``metrics_token`` / ``metrics_open``; CORS follows
    ``settings.cors_origins``: all of it is :mod:`mlx_relay.core.http_access`, installed on the
    app once for every route family.

    Args:
        app: The app to extend.
        metrics_collector: Source of the snapshot.
        health_monitor: This process's health checks, if any.
        settings: The app's HTTP settings (tokens, rate limit, CORS origins).
        registry: Prometheus registry for ``/metrics``; a fresh one by default.
        update_interval: WebSocket update period; default: the collection interval.
        alerts: The alert engine behind ``/api/alerts`` and the alert families, if any.
        history: The history store: serves ``/api/history*`` and ``/api/requests`` and adds
            ``mlxrelay_history_*`` to ``/metrics``.
        traces: The trace store: serves ``/api/requests/{id}/trace`` and ``/api/profile``.

    Returns:
        The context the routes read (its ``broadcaster`` shows the live clients).
    """
    registry = registry if registry is not None else CollectorRegistry()
    health_source = health_monitor.summary if health_monitor is not None else None
    RelayCollector(metrics_collector.snapshot, health_source, registry=registry)
    if alerts is not None:
        AlertsCollector(alerts, registry=registry)
    context = MonitoringContext(
        collector=metrics_collector,
        health=health_monitor,
        registry=registry,
        update_interval=update_interval,
        alerts=alerts,
        max_websocket_clients=settings.max_websocket_clients,
    )
    setattr(app.state, STATE_ATTRIBUTE, context)

    install_access(app, settings)
    auth = Depends(require_token)
    limit = Depends(rate_limit)
    for router in API_ROUTERS:
        app.include_router(router, dependencies=[limit, auth])
    if history is not None:
        _mount_history(app, history, registry, [limit, auth])
    if traces is not None:
        from mlx_relay.monitoring.api import traces as trace_routes

        setattr(app.state, trace_routes.STATE_ATTRIBUTE, traces)
        app.include_router(trace_routes.router, dependencies=[limit, auth])
    app.include_router(page.router, dependencies=[Depends(require_page_token)])
    app.include_router(ws_routes.router)  # checks the token itself: see ws.py
    app.include_router(exposition.router, dependencies=[Depends(require_metrics_token)])
    app.mount(page.STATIC_PATH, page.static_files(), name="monitoring-static")
    return context


def _mount_history(
    app: FastAPI, store: HistoryStore, registry: CollectorRegistry, dependencies: list[Any]
) -> None:
    from mlx_relay.monitoring.api import history as history_routes
    from mlx_relay.monitoring.history import HistoryCollector

    HistoryCollector(store, registry=registry)
    setattr(app.state, history_routes.STATE_ATTRIBUTE, store)
    app.include_router(history_routes.router, dependencies=dependencies)
