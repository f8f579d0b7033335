"""The coordinator's HTTP app: the composition root that builds services, then the app.

One app on one port serves every route. To add a router, add ONE line to
:func:`include_routes` (each router module owns its paths and dependencies); routes read the
services through :data:`mlx_relay.server.deps.ServicesDep` (``request.app.state.services``).
"""

from __future__ import annotations

from fastapi import FastAPI

from mlx_relay import __version__
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.http_access import install_access
from mlx_relay.monitoring.api import mount_monitoring
from mlx_relay.server import openai, readiness
from mlx_relay.server.deps import AppServices

__all__ = ["AppServices", "create_app", "include_routes", "start_services", "stop_services"]


def create_app(services: AppServices) -> FastAPI:
    """The FastAPI app serving ``services``; it starts and stops nothing itself."""
    app = FastAPI(title="mlx-relay", version=__version__)
    app.state.services = services
    include_routes(app, services)
    return app


def include_routes(app: FastAPI, services: AppServices) -> None:
    """Every router of the coordinator's app, one line each."""
    settings = services.config.http
    install_access(app, settings)  # tokens, rate limit and CORS of every route below
    app.include_router(readiness.router)  # GET /health
    app.include_router(openai.router)  # /v1: OpenAI-compatible inference API
    if services.metrics_collector is not None:  # /, /static, /api/*, /ws, /metrics
        mount_monitoring(app, services.metrics_collector, services.health_monitor, settings)


async def start_services(config: ClusterConfig, *, enable_monitoring: bool = True) -> AppServices:
    """Build the coordinator's services: an initialised orchestrator (connected to every
    worker, monitoring started when enabled).

    Raises:
        WorkerUnavailable: workers not SERVING within ``network.connect_timeout``.
        ShardMismatch: the stages' layers differ from the assignment.
    """
    orchestrator = DistributedOrchestrator(config, enable_monitoring=enable_monitoring)
    await orchestrator.initialize()
    return AppServices(
        config=config,
        orchestrator=orchestrator,
        metrics_collector=orchestrator.metrics_collector,
        health_monitor=orchestrator.health_monitor,
    )


async def stop_services(services: AppServices) -> None:
    """End live sessions, stop monitoring and close the worker channels."""
    if services.orchestrator is not None:
        await services.orchestrator.shutdown()
