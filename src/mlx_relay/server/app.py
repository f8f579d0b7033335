"""The coordinator's HTTP app: the composition root that builds services, then the app.

One app on one port serves every route. To add a router, add ONE line to
:func:`include_routes` (each router module owns its paths and dependencies); routes read the
services through :data:`mlx_relay.server.deps.ServicesDep` (``request.app.state.services``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from mlx_relay import __version__
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator
from mlx_relay.coordinator.telemetry import CoordinatorTelemetry
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.http_access import install_access
from mlx_relay.monitoring.alerting import build_alert_engine, configured_rules
from mlx_relay.monitoring.api import mount_monitoring
from mlx_relay.server import openai, readiness
from mlx_relay.server.body_limit import BodySizeLimit
from mlx_relay.server.deps import AppServices
from mlx_relay.server.placement import PlacementSource, mount_placement
from mlx_relay.server.rebalance import Rebalancer, mount_rebalance
from mlx_relay.server.schema import install_served_schema

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
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)  # 413 past the cap
    app.include_router(readiness.router)  # GET /health
    app.include_router(openai.router)  # /v1: OpenAI-compatible inference API
    openai.install_unmatched_errors(app)  # /v1 paths no route takes: OpenAI's error shape
    install_served_schema(app, services)  # /openapi.json with the cluster's limits
    if services.metrics_collector is not None:  # /, /static, /api/*, /ws, /metrics
        mount_monitoring(
            app,
            services.metrics_collector,
            services.health_monitor,
            settings,
            alerts=services.alert_engine,
            history=services.history.store if services.history is not None else None,
            traces=services.orchestrator.traces if services.orchestrator is not None else None,
        )
        placement_services(services)
        assert services.placement is not None
        mount_placement(app, services.placement)  # GET /api/placement
        if services.rebalancer is not None:
            mount_rebalance(app, services.rebalancer)  # /api/placement/apply


def placement_services(services: AppServices) -> None:
    """The placement advisor's inputs and the rebalancer, unless already built."""
    collector = services.metrics_collector
    if services.placement is None and collector is not None:
        services.placement = PlacementSource(services.config, collector.snapshot)
    if services.rebalancer is None and services.placement and services.orchestrator:
        services.rebalancer = Rebalancer(services.orchestrator, services.placement)


async def start_services(config: ClusterConfig, *, enable_monitoring: bool = True) -> AppServices:
    """Build the coordinator's services: its monitoring (when enabled) and an initialised
    orchestrator over it (connected to every worker).

    Raises:
        WorkerUnavailable: workers not SERVING within ``network.connect_timeout``.
        ShardMismatch: the stages' layers differ from the assignment.
    """
    # Rules are checked before any worker is contacted: a bad rule fails start-up at once.
    rules = configured_rules(config.alerting, config.inference) if config.alerting.enabled else None
    monitoring = enable_monitoring and config.monitoring.enabled
    telemetry = CoordinatorTelemetry.from_config(config) if monitoring else None
    orchestrator = DistributedOrchestrator(
        config, enable_monitoring=monitoring, telemetry=telemetry
    )
    await orchestrator.initialize()
    services = AppServices(
        config=config,
        orchestrator=orchestrator,
        metrics_collector=telemetry.collector if telemetry is not None else None,
        health_monitor=telemetry.health if telemetry is not None else None,
    )
    try:
        if rules is not None and telemetry is not None:
            engine = build_alert_engine(config, telemetry.collector, telemetry.health, rules=rules)
            await engine.start()
            services.alert_engine = engine
        services.history = await _start_history(services)
        if services.history is not None and orchestrator.traces is not None:
            # Each finished request's trace summary outlives the traces kept in memory.
            orchestrator.traces.archive = services.history.store
        placement_services(services)
        auto = config.placement.auto_rebalance
        if auto.enabled and services.rebalancer is not None:
            services.rebalancer.start_auto(auto)
    except BaseException:
        # The orchestrator is connected already: close it rather than leak its channels.
        await stop_services(services)
        raise
    return services


async def _start_history(services: AppServices) -> Any | None:
    """The history recorder (started), when monitoring and ``history.enabled`` are on.

    Raises:
        StoreError: the history file cannot be created or opened.
    """
    collector = services.metrics_collector
    if collector is None or not services.config.history.enabled:
        return None
    from mlx_relay.monitoring.history import open_history

    health = services.health_monitor
    recorder = await asyncio.to_thread(
        open_history, services.config.history, collector, health.summary if health else None
    )
    await recorder.start()
    return recorder


async def stop_services(services: AppServices) -> None:
    """Stop alerting, end live sessions, stop monitoring and close the worker channels, then
    write the last history (requests that ended during shutdown included) and close it."""
    try:
        if services.rebalancer is not None:
            await services.rebalancer.stop()
        if services.alert_engine is not None:
            await services.alert_engine.stop()
        if services.orchestrator is not None:
            await services.orchestrator.shutdown()
    finally:
        recorder, services.history = services.history, None
        if recorder is not None:
            await recorder.stop()
            await asyncio.to_thread(recorder.store.close)
