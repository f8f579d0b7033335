"""``mlx-relay dashboard``: the monitoring dashboard without inference.

Alone it monitors this machine; with ``--config`` it also polls every worker of the cluster
(status and Ping, like the coordinator does) and shows them in pipeline order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from mlx_relay.cli.options import (
    TOKEN_ENV,
    add_http_arguments,
    given_token,
    http_settings,
    stop_signals,
)
from mlx_relay.core.config import ClusterConfig, HTTPConfig, MonitoringConfig
from mlx_relay.core.errors import RelayError, WorkerUnavailable
from mlx_relay.core.types import LayerRange

DEVICE_ID = "dashboard"
ROLE = "dashboard"
LAYER_LOOKUP_TIMEOUT = 5.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dashboard",
        help="serve the monitoring dashboard on its own",
        description=(
            "Serve the dashboard, the monitoring API (/api/*, /ws) and /metrics for this "
            "machine, and with --config for every worker of the cluster (polled over gRPC). "
            f"The bearer token comes from --token, else ${TOKEN_ENV}, else the config."
        ),
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="cluster configuration (YAML)")
    add_http_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cluster = ClusterConfig.from_yaml(args.config) if args.config else None
    monitoring = cluster.monitoring if cluster is not None else MonitoringConfig()
    base = cluster.http if cluster is not None else HTTPConfig()
    settings = http_settings(base, args.host, args.port, given_token(args))
    return asyncio.run(_serve(settings, monitoring, cluster))


async def _serve(
    settings: HTTPConfig, monitoring: MonitoringConfig, cluster: ClusterConfig | None
) -> int:
    from mlx_relay.core.http_access import exposure_warning
    from mlx_relay.monitoring.dashboard import MonitoringDashboard
    from mlx_relay.monitoring.from_config import collector_from_config, health_monitor_from_config

    collector = collector_from_config(DEVICE_ID, ROLE, monitoring)
    health = health_monitor_from_config(DEVICE_ID, monitoring, collector)
    # A dashboard serves no model: that check would only ever say "unknown".
    health.unregister_check("service_availability")
    dashboard = MonitoringDashboard(collector, health, config=settings)
    warning = exposure_warning(dashboard.host, settings)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)

    with stop_signals() as stop_requested:
        try:
            await collector.start()
            await health.start()
            async with _cluster_polling(cluster, collector, health, monitoring):
                try:
                    await dashboard.start()
                except OSError as exc:
                    print(
                        f"mlx-relay dashboard: error: cannot serve on {dashboard.url}: {exc}",
                        file=sys.stderr,
                    )
                    return 1
                hint = " (open it with ?token=<your token>)" if settings.auth_token else ""
                print(f"dashboard on {dashboard.url}/{hint}", file=sys.stderr)
                await stop_requested.wait()
                print("dashboard stopping", file=sys.stderr)
        finally:
            await dashboard.stop()
            await health.stop()
            await collector.stop()
    return 0


@contextlib.asynccontextmanager
async def _cluster_polling(
    cluster: ClusterConfig | None, collector: Any, health: Any, monitoring: MonitoringConfig
) -> AsyncIterator[None]:
    """Poll the cluster's workers into ``collector`` and ``health`` while the block runs."""
    if cluster is None:
        yield
        return
    from mlx_relay.coordinator.client import WorkerClient
    from mlx_relay.coordinator.cluster import ClusterMonitor
    from mlx_relay.coordinator.pipeline import Stage
    from mlx_relay.coordinator.telemetry import register_stages
    from mlx_relay.core.tls_config import tls_material

    tls = tls_material(cluster, cluster.coordinator_id)
    clients = [
        WorkerClient.for_device(w, cluster.network, recorder=collector, tls=tls)
        for w in cluster.workers
    ]
    monitor: ClusterMonitor | None = None
    try:
        stages = [
            Stage(i, w.id, w.address, await _layers_of(w, client))
            for i, (w, client) in enumerate(zip(cluster.workers, clients, strict=True))
        ]
        register_stages(collector, stages)
        monitor = ClusterMonitor(
            stages,
            clients,
            collector,
            health,
            poll_interval=monitoring.poll_interval,
            timeout=cluster.network.ping_timeout,
        )
        await monitor.start()
        yield
    finally:
        if monitor is not None:
            await monitor.stop()
        for client in clients:
            await client.close()


async def _layers_of(worker: Any, client: Any) -> LayerRange:
    """A worker's layers: from the config, or asked of the worker when they are ``auto``."""
    if isinstance(worker.layers, LayerRange):
        return worker.layers
    try:
        status = await client.get_status(timeout=LAYER_LOOKUP_TIMEOUT, retry=False)
    except RelayError as exc:
        raise WorkerUnavailable(
            worker.id,
            f"not reachable at {worker.address} and its layers are 'auto', so its place in "
            f"the pipeline is unknown: start the workers first or give explicit layers ({exc})",
        ) from exc
    return LayerRange(status.layer_start, status.layer_end)
