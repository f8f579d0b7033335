"""The standalone monitoring dashboard: the monitoring routes on their own uvicorn server.

The coordinator serves the same routes from its one HTTP app (see
:func:`mlx_relay.monitoring.api.mount_monitoring`); this module is for a process that only
monitors.

Example::

    dashboard = MonitoringDashboard(collector, health, port=0)
    await dashboard.start()
    print(dashboard.url)
    ...
    await dashboard.stop()
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from mlx_relay import __version__
from mlx_relay.core.addresses import http_url
from mlx_relay.core.config import HTTPConfig
from mlx_relay.core.http_access import warn_if_exposed
from mlx_relay.core.http_server import HTTPServer
from mlx_relay.monitoring.alerting.engine import AlertEngine
from mlx_relay.monitoring.api import MonitoringContext, mount_monitoring
from mlx_relay.monitoring.health import HealthMonitor
from mlx_relay.monitoring.metrics import MetricsCollector

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 3


def build_dashboard_app(
    metrics_collector: MetricsCollector,
    health_monitor: HealthMonitor | None,
    config: HTTPConfig,
    *,
    update_interval: float | None = None,
    alerts: AlertEngine | None = None,
) -> tuple[FastAPI, MonitoringContext]:
    """A FastAPI app serving only the monitoring routes."""
    app = FastAPI(
        title="mlx-relay monitoring",
        version=__version__,
        description="Metrics, health, devices and throughput of an mlx-relay cluster.",
    )
    context = mount_monitoring(
        app,
        metrics_collector,
        health_monitor,
        config,
        update_interval=update_interval,
        alerts=alerts,
    )
    return app, context


class MonitoringDashboard:
    """Web dashboard, REST API, WebSocket and ``/metrics`` on one uvicorn server.

    Args:
        metrics_collector: Source of the snapshot.
        health_monitor: This process's health checks (may be None).
        host: Address to bind; default ``config.host`` (127.0.0.1).
        port: Port to bind, 0 for any free port; default ``config.port`` (8080).
        config: Security settings; default: no token, loopback only.
        update_interval: WebSocket update period; default: the collection interval.
        alerts: A (started) alert engine to serve at ``/api/alerts``; its owner stops it.
    """

    def __init__(
        self,
        metrics_collector: MetricsCollector,
        health_monitor: HealthMonitor | None,
        host: str | None = None,
        port: int | None = None,
        *,
        config: HTTPConfig | None = None,
        update_interval: float | None = None,
        alerts: AlertEngine | None = None,
    ) -> None:
        config = config or HTTPConfig()
        self.host = host if host is not None else config.host
        self._requested_port = port if port is not None else config.port
        self.config = config
        self.app, self.context = build_dashboard_app(
            metrics_collector,
            health_monitor,
            config,
            update_interval=update_interval,
            alerts=alerts,
        )
        self._http: HTTPServer | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._http.port if self._http is not None else self._requested_port

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    async def start(self) -> None:
        """Bind and serve in the background; returns once the server accepts connections.

        Raises:
            BindError: The address cannot be bound (an ``OSError`` as well).
        """
        if self._http is not None:
            return
        warn_if_exposed(self.host, self.config)
        http = HTTPServer(
            self.app,
            self.host,
            self._requested_port,
            graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            name="monitoring-dashboard",
        )
        await http.start()
        self._http = http
        logger.info("monitoring dashboard on %s", self.url)

    async def stop(self) -> None:
        """Close live clients, stop accepting connections and wait for the server to end."""
        http, self._http = self._http, None
        if http is None:
            return
        await self.context.broadcaster.close()
        await http.stop()
        logger.info("monitoring dashboard stopped")

    async def serve_forever(self) -> None:
        """Start, then serve until cancelled; stops cleanly either way."""
        await self.start()
        try:
            assert self._http is not None
            await self._http.wait()
        finally:
            await self.stop()


async def start_monitoring_dashboard(
    metrics_collector: MetricsCollector,
    health_monitor: HealthMonitor | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    config: HTTPConfig | None = None,
) -> None:
    """Serve the dashboard for ``metrics_collector`` and ``health_monitor`` until cancelled."""
    dashboard = MonitoringDashboard(metrics_collector, health_monitor, host, port, config=config)
    await dashboard.serve_forever()
